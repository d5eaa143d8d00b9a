"""The A/B stick's installer (issue #19): one release of the stick's OS fetched from the head,
checked, and written into the other slot by systemd-sysupdate.

The contract with the image (image/mkosi.extra/usr/lib/sysupdate.d/, written by build-image.sh):

- systemd-sysupdate's transfers read a local directory, `INCOMING` on the data partition
  (Source Type=regular-file), for `garage-node_@v.root.raw` (the root partition's image) and
  `garage-node_@v.efi` (the UKI). Their targets are the root partition pair (labels
  garage-root_@v, the empty one `_empty`) and the ESP's /EFI/Linux with boot counting.
- The operator's public release key(s) are on the stick at `RELEASE_KEYS`.

A regular-file source is not verified by sysupdate (only its url sources are), so this module
checks everything first, in this order, and writes nothing to the incoming directory unless all
of it holds: SHA256SUMS' signature by a key the stick carries; release.json listed and matching
its sum, naming the version asked for, this stick's variant, and the file names the transfers
look for; every byte of the root and the UKI matching its sum as it arrives. The download goes
to `DOWNLOAD/<version>/` (resumed with range requests after a broken connection); only then are
the two files renamed into `INCOMING` (same file system: no copy) and
`systemd-sysupdate update VERSION` run. What it refuses is an `InstallError` with `retry` False:
the caller never tries that version again (node/updatepart.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx

from garage_node.core import gpgstatus
from garage_node.core import releasefiles as rf
from garage_node.core.fsutil import fsync_dir, sha256_of
from garage_node.node.weights import HttpSource, Source

log = logging.getLogger(__name__)

DATA = Path("/var/lib/garage-node-data/update")
INCOMING = DATA / "incoming"  # sysupdate's Source Path= (the image's transfer definitions)
DOWNLOAD = DATA / "download"
RELEASE_KEYS = Path("/usr/share/garage-node/release-keys.gpg")
SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
MIB = CHUNK = 1024 * 1024
RESERVE = 256 * MIB  # left free on the data partition during a download
SMALL_MAX = 64 * 1024  # SHA256SUMS, its signature and release.json: a few lines each
ATTEMPTS = 3  # a broken download resumes this often, and a file that fails its sum is fetched again once
SYSUPDATE_TIMEOUT_S = 3600.0  # a 3.5 GiB root onto a slow USB 2 stick
GPG_TIMEOUT_S = 60.0
Progress = Callable[[int], None]  # percent of the bytes to download


class InstallError(Exception):
    """A release was not installed; the message says why. `retry`: trying again later may help
    (the head unreachable, a broken download, a failed write); False: the release itself was
    refused (signature, sums, variant) and that version is not tried again."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


def root_name(version: str) -> str:
    return f"garage-node_{version}.root.raw"


def uki_name(version: str) -> str:
    return f"garage-node_{version}.efi"


@dataclass(frozen=True)
class Verified:
    """A release whose files are downloaded and checked, waiting in the download directory."""

    version: str
    signer: str  # the fingerprint of the key that signed SHA256SUMS
    root: Path
    uki: Path


# -- the signature


def verify_signature(keyring: Path, data: Path, signature: Path) -> str:
    """The fingerprint of the key in `keyring` that made the detached `signature` over `data`;
    InstallError (not retried) otherwise. Through `gpgv`, which only verifies: no import, no
    gpg-agent, nothing written but a throwaway home. An armored keyring is dearmored first
    (`gpg --dearmor` needs no agent either); the stick's is binary (`gpg --export`)."""
    if not keyring.is_file():
        raise InstallError(f"this stick carries no release key ({keyring} is missing): it cannot check a release; "
                           "flash a stick built with `build-image.sh --signing-key`")
    with tempfile.TemporaryDirectory(prefix="garage-gpgv-") as home_s:
        home = Path(home_s)
        binary = keyring.resolve()
        if keyring.read_bytes()[:64].lstrip().startswith(b"-----BEGIN PGP"):
            binary = home / "keyring.gpg"
            d = _run(["gpg", "--batch", "--no-tty", "--no-options", "--homedir", str(home), "--dearmor",
                      "--output", str(binary), str(keyring.resolve())], home)
            if d.returncode != 0:
                raise InstallError(f"{keyring} holds no usable OpenPGP public key: flash a stick built with "
                                   "`build-image.sh --signing-key`")
        p = _run(["gpgv", "--homedir", str(home), "--keyring", str(binary), "--status-fd", "1",
                  str(signature.resolve()), str(data.resolve())], home)
    verdict = gpgstatus.read(p.stdout, p.returncode)
    if verdict.good:
        return verdict.signer
    if verdict.changed:
        raise InstallError(f"the signature {rf.SIGNATURE} does not match {rf.SUMS}: the release was changed after it "
                           "was signed; nothing was installed")
    if verdict.unknown_key:
        raise InstallError(f"{rf.SUMS} is signed by a key this stick does not carry: the operator must sign releases "
                           "with the key the sticks were built with; nothing was installed")
    raise InstallError(f"{rf.SIGNATURE} is not a valid signature of {rf.SUMS}; nothing was installed")


def _run(cmd: list[str], home: Path) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GNUPGHOME": str(home), "LC_ALL": "C"}
    try:
        return subprocess.run(cmd, capture_output=True, env=env, timeout=GPG_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise InstallError(f"{cmd[0]} is not on this stick (Debian packages gpgv, gnupg): it cannot check a "
                           "release") from None


# -- the installer


@dataclass
class Installer:
    """Fetch, check and install one release. `source`: the head's control API with this PC's
    credential (node/weights.py head_source); `variant`: this stick's (os-release VARIANT_ID)."""

    source: Source
    variant: str | None
    keyring: Path = RELEASE_KEYS
    download_dir: Path = DOWNLOAD
    incoming_dir: Path = INCOMING
    sysupdate: Sequence[str] = (SYSUPDATE, "--no-pager")
    reserve: int = RESERVE  # bytes left free on the data partition

    def fetch(self, version: str, progress: Progress | None = None,
              stop: threading.Event | None = None) -> Verified:
        """Download release `version` into the download directory and check it all. Raises
        InstallError. What arrived of the root and UKI is kept and resumed on the next call."""
        try:
            rf.check_version(version)
        except ValueError as e:
            raise InstallError(f"the head named {e}") from None
        work = self._workdir(version)
        self._reclaim_incoming(version, work)
        sums_raw = self._small(version, rf.SUMS)
        (work / rf.SUMS).write_bytes(sums_raw)
        (work / rf.SIGNATURE).write_bytes(self._small(version, rf.SIGNATURE))
        signer = verify_signature(self.keyring, work / rf.SUMS, work / rf.SIGNATURE)
        try:
            sums = rf.parse_sums(sums_raw)
        except ValueError as e:
            raise InstallError(f"release {version}: {e}") from None
        manifest = self._manifest(version, sums)
        total = sum(self._expected_size(version, name) for name in (manifest.root, manifest.uki))
        self._check_room(version, work, total, self.reserve)
        got = _Counter(progress, total)
        for name in (manifest.root, manifest.uki):
            self._fetch_file(version, name, sums[name], work, got, stop)
        log.info("release %s downloaded and checked (signed by %s)", version, signer)
        return Verified(version, signer, work / manifest.root, work / manifest.uki)

    def install(self, v: Verified) -> None:
        """Hand the checked files to systemd-sysupdate, which writes the other slot and the
        UKI with its tries. Raises InstallError (retry: the write failed)."""
        # Checked once more: the bytes sysupdate reads are the bytes that were signed.
        sums = rf.parse_sums((v.root.parent / rf.SUMS).read_bytes())
        for f in (v.root, v.uki):
            if sha256_of(f, CHUNK).hexdigest() != sums.get(f.name):
                f.unlink(missing_ok=True)
                raise InstallError(f"{f.name} changed on this PC's disk after it was checked (a failing data "
                                   "partition?): downloading it again", retry=True)
        self._empty(self.incoming_dir)
        for f in (v.root, v.uki):
            _move(f, self.incoming_dir / f.name)
        fsync_dir(self.incoming_dir)
        cmd = [*self.sysupdate, "update", v.version]
        log.info("installing %s: %s", v.version, " ".join(cmd))
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=SYSUPDATE_TIMEOUT_S, check=False)
            why = None if p.returncode == 0 else _last_line(p.stderr, f"exit {p.returncode}")
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"could not be run: {e}"
        if why is not None:
            for f in (v.root, v.uki):  # kept for the next try: no second download
                _move(self.incoming_dir / f.name, f)
            raise InstallError(f"systemd-sysupdate failed ({why[:300]}); still on the current version", retry=True)
        # Copied into the slot and the ESP: the data partition's space is the models'.
        self._empty(self.incoming_dir)
        shutil.rmtree(self.download_dir / v.version, ignore_errors=True)
        log.info("release %s written to the other slot", v.version)

    # -- steps

    def _workdir(self, version: str) -> Path:
        """This version's download directory; those of other versions go (one at a time)."""
        self.download_dir.mkdir(parents=True, exist_ok=True)
        for d in self.download_dir.iterdir():
            if d.name != version:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        work = self.download_dir / version
        work.mkdir(exist_ok=True)
        return work

    def _reclaim_incoming(self, version: str, work: Path) -> None:
        """What an install cut short left in the incoming directory (the power went while
        sysupdate wrote): this version's files go back to its download directory, to be hashed
        again rather than downloaded again; anything else goes. Left there, gigabytes would fill
        the data partition and the next try would refuse for want of room (seen in QEMU)."""
        if not self.incoming_dir.is_dir():
            return
        for f in self.incoming_dir.iterdir():
            if f.is_file() and f.name in (root_name(version), uki_name(version)) and not (work / f.name).exists():
                _move(f, work / f.name)
            else:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)

    @staticmethod
    def _empty(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)

    def _manifest(self, version: str, sums: dict[str, str]) -> rf.ReleaseManifest:
        if rf.MANIFEST not in sums:
            raise InstallError(f"release {version}: {rf.SUMS} does not list {rf.MANIFEST}; nothing was installed")
        raw = self._small(version, rf.MANIFEST)
        if hashlib.sha256(raw).hexdigest() != sums[rf.MANIFEST]:
            raise InstallError(f"release {version}: {rf.MANIFEST} does not match its sum in the signed {rf.SUMS}; "
                               "nothing was installed")
        try:
            m = rf.ReleaseManifest.parse(raw)
        except ValueError as e:
            raise InstallError(f"release {version}: {e}") from None
        if m.version != version:
            raise InstallError(f"the head's release {version} is version {m.version} inside: nothing was installed")
        if self.variant is None or m.variant != self.variant:
            raise InstallError(f"release {version} is for the {m.variant} stick, and this stick is "
                               f"{self.variant or 'of no known variant'}: the operator must publish a {self.variant} "
                               "build; nothing was installed")
        for role, name, want in (("root", m.root, root_name(version)), ("uki", m.uki, uki_name(version))):
            if name != want or name not in sums:
                raise InstallError(f"release {version}: its {role} must be {want}, listed in {rf.SUMS} (the stick's "
                                   "transfer definitions look for that name); nothing was installed")
        return m

    @staticmethod
    def _check_room(version: str, work: Path, total: int, reserve: int) -> None:
        """Room on the data partition for what is still to come, and some to spare (logs, the
        agent's state): else a clear reason, and the next try looks again."""
        present = sum(p.stat().st_size for p in work.iterdir() if p.is_file())
        need = total - present + reserve
        free = shutil.disk_usage(work).free
        if need > free:
            raise InstallError(f"release {version} needs {-(-need // MIB)} MiB on the data partition but "
                               f"{free // MIB} MiB are free; it holds the models too: remove those this PC no longer "
                               "serves, or move to a bigger stick", retry=True)

    def _get(self, version: str, name: str, headers: dict[str, str] | None = None) -> _Get:
        return _Get(self.source, f"{rf.release_path(version)}{name}", headers or {}, version, name)

    def _small(self, version: str, name: str) -> bytes:
        with self._get(version, name) as resp:
            _expect(resp, version, name, (200,))
            out = bytearray()
            try:
                for chunk in resp.iter_bytes(CHUNK):
                    out += chunk
                    if len(out) > SMALL_MAX:
                        raise InstallError(f"release {version}: {name} is over {SMALL_MAX} bytes; not a release file")
            except httpx.HTTPError as e:
                raise InstallError(f"fetching {name} of {version} broke off ({_reason(e)})", retry=True) from None
        return bytes(out)

    def _expected_size(self, version: str, name: str) -> int:
        """For progress only (HEAD is not served): the file's length from a one-byte range."""
        with self._get(version, name, {"Range": "bytes=0-0"}) as resp:
            _expect(resp, version, name, (200, 206))
            if resp.status_code == 206:
                try:
                    return int(resp.headers.get("content-range", "").rsplit("/", 1)[1])
                except (IndexError, ValueError):
                    return 0
            return int(resp.headers.get("content-length", "0") or 0)

    def _fetch_file(self, version: str, name: str, want: str, work: Path, got: _Counter,
                    stop: threading.Event | None) -> None:
        done, part = work / name, work / f"{name}.part"
        if done.is_file():
            if sha256_of(done, CHUNK).hexdigest() == want:  # checked by an earlier, interrupted run
                got.finish(done.stat().st_size)
                return
            done.unlink()
        broken = mismatched = 0
        while True:
            try:
                digest = self._stream(version, name, part, got, stop)
            except _Broken as e:
                broken += 1
                if broken >= ATTEMPTS:
                    raise InstallError(f"the download of {name} broke off {broken} times ({e}); it resumes on the "
                                       "next try", retry=True) from None
                log.warning("download of %s broke off (%s): resuming", name, e)
                continue
            if digest == want:
                os.replace(part, done)
                got.finish(done.stat().st_size)
                return
            part.unlink(missing_ok=True)
            mismatched += 1
            if mismatched >= 2:
                raise InstallError(f"{name} from the head does not match its sum in the signed {rf.SUMS} (twice): "
                                   "the head's copy is damaged or was changed; nothing was installed")
            log.warning("%s did not match its sum: fetching it again", name)

    def _stream(self, version: str, name: str, part: Path, got: _Counter, stop: threading.Event | None) -> str:
        have = part.stat().st_size if part.exists() else 0
        h = sha256_of(part, CHUNK) if have else hashlib.sha256()
        got.start(have)
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self._get(version, name, headers) as resp:
                if have and resp.status_code == 206 and _range_start(resp) == have:
                    mode = "ab"
                elif resp.status_code == 200:
                    got.start(0)
                    mode, h = "wb", hashlib.sha256()  # the whole file (the range was not honoured)
                elif resp.status_code == 416 or resp.status_code == 206:
                    part.unlink(missing_ok=True)
                    raise _Broken("the head answered another range than asked: starting the file over")
                else:
                    _expect(resp, version, name, (200,))
                    raise AssertionError("unreachable")
                with open(part, mode) as out:
                    for chunk in resp.iter_bytes(CHUNK):
                        if stop is not None and stop.is_set():
                            raise InstallError(f"the download of {version} was stopped; it resumes on the next try",
                                               retry=True)
                        out.write(chunk)
                        h.update(chunk)
                        got.add(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
        except httpx.HTTPError as e:
            raise _Broken(_reason(e)) from None
        return str(h.hexdigest())


class _Get:
    """One GET on the head with the errors this module speaks in."""

    def __init__(self, source: Source, path: str, headers: dict[str, str], version: str, name: str) -> None:
        self.source, self.path, self.headers, self.version, self.name = source, path, headers, version, name
        self._cm: AbstractContextManager[httpx.Response] | None = None

    def __enter__(self) -> httpx.Response:
        try:
            self._cm = self.source.get(self.path, self.headers)
            return self._cm.__enter__()
        except httpx.HTTPError as e:
            raise InstallError(f"the head is unreachable ({_reason(e)}): the update to {self.version} waits for it",
                               retry=True) from None

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            try:
                self._cm.__exit__(None, None, None)
            except httpx.HTTPError:
                pass


class _Broken(Exception):
    """A download stopped before the file was whole: resumed."""


class _Counter:
    """Percent of the release's bytes here: the files finished, and the one under way."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.finished, self.current, self.last = progress, max(total, 1), 0, 0, -1

    def start(self, have: int) -> None:
        self.current = 0
        self.add(have)

    def finish(self, size: int) -> None:
        self.finished += size
        self.current = 0

    def add(self, n: int) -> None:
        self.current += n
        pct = min(100, max(0, (self.finished + self.current) * 100 // self.total))
        if self.progress is not None and pct != self.last:
            self.last = pct
            self.progress(pct)


def _expect(resp: httpx.Response, version: str, name: str, ok: tuple[int, ...]) -> None:
    if resp.status_code in ok:
        return
    resp.read()
    try:
        message = str(json.loads(resp.content).get("message", ""))[:300]
    except (ValueError, AttributeError):
        message = ""
    # The head not holding it, or refusing this PC now (a credential being renewed), may change:
    # the next pass asks again.
    raise InstallError(f"the head answered {resp.status_code} for {name} of release {version}: "
                       f"{message or 'no reason given'}", retry=True)


def _move(src: Path, dest: Path) -> None:
    """A rename on the stick (both under the data partition's update/); a copy elsewhere."""
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(src, dest)


def _last_line(stderr: bytes, default: str) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else default


def _range_start(resp: httpx.Response) -> int:
    try:
        return int(resp.headers.get("content-range", "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _reason(e: httpx.HTTPError) -> str:
    # httpx's messages hold no request headers (the credential); keep them short.
    return (str(e) or type(e).__name__).splitlines()[0][:200]


# -- a release directory on this PC, served as the head serves it


class ReleaseDirTransport(httpx.BaseTransport):
    """The head's /v1/releases/VERSION/NAME answered from a release directory on this PC
    (build-image.sh's, carried on a disk to a PC that cannot reach its head; the image tests),
    ranges included, so the installer's checks run exactly as for the head's files."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        version, _, name = request.url.path.removeprefix(rf.RELEASES_PREFIX).partition("/")
        try:
            rf.check_version(version)
            if name not in (rf.SUMS, rf.SIGNATURE):
                rf.check_file_name(name)
        except ValueError as e:
            return httpx.Response(404, json={"message": str(e)})
        f = self.dir / name
        if not request.url.path.startswith(rf.RELEASES_PREFIX) or not f.is_file():
            return httpx.Response(404, json={"message": f"{self.dir} has no {name[:100]}"})
        size = f.stat().st_size
        start, end = 0, size - 1
        rng = request.headers.get("range", "")
        if rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            try:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            except ValueError:
                return httpx.Response(416)
            if start > end:
                return httpx.Response(416)
        headers = {"content-length": str(end - start + 1)}
        if rng:
            headers["content-range"] = f"bytes {start}-{end}/{size}"
        return httpx.Response(206 if rng else 200, headers=headers, stream=_FileStream(f, start, end + 1))


class _FileStream(httpx.SyncByteStream):
    def __init__(self, path: Path, start: int, stop: int) -> None:
        self.path, self.start, self.stop = path, start, stop

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = self.stop - self.start
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk


def dir_source(directory: Path) -> HttpSource:
    return HttpSource(httpx.Client(transport=ReleaseDirTransport(directory)), "http://release-dir", lambda: {})


def reboot() -> None:
    """Into the new version: systemd-boot picks the newest UKI, which has its tries."""
    try:
        p = subprocess.run(["systemctl", "reboot"], capture_output=True, check=False, timeout=60)
        why = None if p.returncode == 0 else _last_line(p.stderr, f"exit {p.returncode}")
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why is not None:
        raise InstallError(f"the new version is installed but `systemctl reboot` failed ({why[:200]}): it starts "
                           "at the next reboot", retry=True)
