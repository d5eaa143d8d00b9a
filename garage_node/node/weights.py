"""Model weights on a PC: fetched from the head's model store (head/modelstore.py), kept on the
data partition, and used only once every file matched the SHA-256 in the model's manifest.

On disk, under `root` (e.g. /var/lib/garage-node/weights):

    <root>/<name>/model/...           a held model: the directory an engine is given
    <root>/<name>/manifest.json       the manifest its files were checked against
    <root>/<name>/last-used           when it was last used (least recently used goes first)
    <root>/.incoming/<name>/          a download under way or interrupted:
        manifest.json                   what is being fetched (another version: started over)
        parts/<path>                    a file not complete yet, resumed with a range request
        model/<path>                    a file complete and checked

A download becomes a held model by one rename of its directory, after the last file is
checked: a model is either held whole and checked, or not held at all. A file whose sum does
not match is deleted and fetched again; one that still does not match after `attempts` tries
fails the fetch (the head's copy is damaged) and nothing of it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping, Protocol

import httpx

from garage_node.core import modelfiles
from garage_node.core.fsutil import fsync_dir, sha256_of, write_private
from garage_node.core.modelfiles import Manifest, ModelFile, check_name
from garage_node.core.wire import encode
from garage_node.node.identity import Identity

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CHUNK = 1024 * 1024
MODEL_DIR = "model"
MANIFEST_FILE = "manifest.json"
LAST_USED = "last-used"
INCOMING = ".incoming"
PARTS = "parts"
# Left free on the data partition whatever the cap says: logs and the agent's state need room.
RESERVE_MIB = 512
# A read that waits longer than this for the next bytes counts as a broken download (resumed).
READ_TIMEOUT_S = 60.0

Progress = Callable[[int], None]  # percent, 0-100


def weights_root(state_dir: Path) -> Path:
    """Where a PC keeps the weights it fetched: in its state directory on the data partition
    (beside [engine] cache_dir, the model hub's cache, which this does not touch)."""
    return state_dir / "weights"


class WeightsError(Exception):
    """A model could not be fetched or kept; the message says what to do. `retry`: trying again
    later may help (the head unreachable, a broken download, which resumes)."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


class Source(Protocol):
    """Where weights come from: GET `path` (a path on the head's control API) with `headers`,
    as a streaming response (used in a `with`)."""

    def get(self, path: str, headers: Mapping[str, str]) -> AbstractContextManager[httpx.Response]: ...


class HttpSource:
    """A Source over an httpx client; `auth()` gives the headers that authenticate this node,
    read at every request (a renewal changes the credential)."""

    def __init__(self, client: httpx.Client, base_url: str, auth: Callable[[], Mapping[str, str]]) -> None:
        self.client, self.base_url, self.auth = client, base_url.rstrip("/"), auth

    def get(self, path: str, headers: Mapping[str, str]) -> AbstractContextManager[httpx.Response]:
        return self.client.stream("GET", self.base_url + path, headers={**self.auth(), **headers})

    def close(self) -> None:
        self.client.close()


def head_source(identity: Callable[[], Identity], ca_pem: bytes) -> HttpSource:
    """The head's control API over HTTPS pinned to its CA (as heartbeats are), with the node's
    credential; its own connection, so a long download never holds up a heartbeat."""
    from garage_node.node.headclient import tls_context  # TLS 1.3 only, as heartbeats

    client = httpx.Client(verify=tls_context(ca_pem), timeout=httpx.Timeout(READ_TIMEOUT_S, connect=10.0))

    def auth() -> Mapping[str, str]:
        ident = identity()
        return {"Authorization": f"Bearer {ident.credential}", modelfiles.NODE_HEADER: ident.node_id}

    return HttpSource(client, identity().api_url, auth)


@dataclass(frozen=True)
class HeldModel:
    name: str
    bytes: int
    digest: str
    last_used: float
    path: Path


class Weights:
    """The models a PC holds. `max_mib`: the most the held models (and a download under way)
    may take, None: as much as the data partition has, less RESERVE_MIB."""

    def __init__(self, root: Path, max_mib: int | None = None, *, reserve_mib: int = RESERVE_MIB,
                 attempts: int = 3, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.max_mib = max_mib
        self.reserve_mib = reserve_mib
        self.attempts = attempts
        self.clock = clock
        self._lock = threading.Lock()  # one fetch (and its evictions) at a time

    # -- what is held

    def held(self) -> list[str]:
        """Names of the models held whole and checked, sorted."""
        return [m.name for m in self.models()]

    def models(self) -> list[HeldModel]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if modelfiles.MODEL_NAME.match(p.name):
                m = self._held_model(p.name)
                if m is not None:
                    out.append(m)
        return out

    def local_dir(self, name: str) -> Path | None:
        """The directory an engine serves model `name` from; None unless held whole and checked."""
        m = self._held_model(name) if modelfiles.MODEL_NAME.match(name) else None
        return m.path if m is not None else None

    def touch(self, name: str) -> None:
        """Record that model `name` is in use now (the least recently used is evicted first)."""
        if self.local_dir(name) is not None:
            write_private(self.root / name / LAST_USED, f"{self.clock():.3f}\n".encode(), mode=0o644)

    def remove(self, name: str) -> bool:
        if not modelfiles.MODEL_NAME.match(name) or not (self.root / name).exists():
            return False
        _delete(self.root / name, self.root)
        return True

    def _held_model(self, name: str) -> HeldModel | None:
        """A held model, if its manifest reads and every file is there with its size (a cheap
        check that catches a truncated or missing file; the sums were checked at download)."""
        d = self.root / name
        try:
            m = Manifest.parse(json.loads((d / MANIFEST_FILE).read_text()))
        except (OSError, ValueError):
            return None
        if m.name != name:
            return None
        for f in m.files:
            try:
                if (d / MODEL_DIR / f.path).stat().st_size != f.size:
                    return None
            except OSError:
                return None
        return HeldModel(name, m.total_bytes, m.digest, self._last_used(d), d / MODEL_DIR)

    @staticmethod
    def _last_used(d: Path) -> float:
        try:
            return float((d / LAST_USED).read_text())
        except (OSError, ValueError):
            try:
                return (d / MANIFEST_FILE).stat().st_mtime
            except OSError:
                return 0.0

    # -- fetching

    def fetch(self, name: str, weights_path: str, source: Source, progress: Progress | None = None,
              keep: Collection[str] = (), stop: threading.Event | None = None) -> Path:
        """Make model `name` held, from the head's store at `weights_path` (Assignment.weights_path),
        and return its directory. Resumes an interrupted download; checks every file's SHA-256;
        evicts the least recently used models (never `name`, nor one in `keep`: the model in use)
        when room runs short; reports `progress` in percent; `stop` set: stops soon (WeightsError,
        retry; what arrived is kept and resumed). Held already at the head's version:
        returns at once. The head unreachable but the model held (any version): returns it.
        Raises WeightsError."""
        try:
            check_name(name)
        except ValueError as e:
            raise WeightsError(str(e)) from None
        if not (weights_path.startswith("/") and weights_path.endswith("/") and ".." not in weights_path):
            raise WeightsError(f"the head gave {weights_path[:100]!r} as the store's path for {name}, which is not a "
                               "path on its control API: is the head running the same garage-node version?")
        with self._lock:
            try:
                manifest = self._remote_manifest(name, weights_path, source)
            except WeightsError as e:
                held = self.local_dir(name)
                if held is not None and e.retry:
                    log.warning("weights for %s: %s; using the copy held here", name, e)
                    self.touch(name)
                    return held
                raise
            held_model = self._held_model(name)
            if held_model is not None and held_model.digest == manifest.digest:
                self.touch(name)
                _report(progress, 100)
                return held_model.path
            job = _Job(manifest, weights_path, source, _ProgressReporter(progress, manifest.total_bytes), stop)
            return self._download(job, {name, *keep})

    def _remote_manifest(self, name: str, weights_path: str, source: Source) -> Manifest:
        try:
            with source.get(weights_path + modelfiles.MANIFEST, {}) as resp:
                resp.read()
                status = resp.status_code
                body = resp.content
        except httpx.HTTPError as e:
            raise WeightsError(f"the head's model store is unreachable ({_reason(e)}): the download of {name} "
                               "starts when it answers again", retry=True) from None
        if status != 200:
            raise _refusal(name, status, body)
        try:
            manifest = Manifest.parse(json.loads(body))
        except ValueError as e:
            raise WeightsError(f"the head sent a manifest for {name} that this node cannot read ({e}): is it running "
                               "the same garage-node version?") from None
        if manifest.name != name:
            raise WeightsError(f"the head answered with the manifest of {manifest.name} when asked for {name}: "
                               "report this to the operator")
        return manifest

    def _download(self, job: _Job, keep: set[str]) -> Path:
        manifest, name = job.manifest, job.manifest.name
        try:
            job.work = self._incoming(manifest)
            job.progress.set(self._bytes_present(job.work, manifest))
            self._make_room(manifest.total_bytes - self._bytes_present(job.work, manifest), keep, name)
            for f in manifest.files:
                done = job.work / MODEL_DIR / f.path
                if done.is_file() and done.stat().st_size == f.size:
                    continue  # complete and checked by an earlier (interrupted) fetch
                self._fetch_file(job, f)
            write_private(job.work / LAST_USED, f"{self.clock():.3f}\n".encode(), mode=0o644)
            self._swap_in(name, job.work)
        except OSError as e:
            # The data partition full, or failing: what arrived stays for the next try.
            raise WeightsError(f"writing {name} under {self.root} failed ({e.strerror or e}): check the data "
                               "partition (free space, errors in the kernel log)", retry=True) from None
        job.progress.set(manifest.total_bytes)
        log.info("weights for %s held: %d files, %.1f MiB, checked", name, len(manifest.files),
                 manifest.total_bytes / MIB)
        return self.root / name / MODEL_DIR

    def _incoming(self, manifest: Manifest) -> Path:
        """The download directory for this version of the model; one for another version (the
        operator re-added the model) is started over."""
        work = self.root / INCOMING / manifest.name
        try:
            started = Manifest.parse(json.loads((work / MANIFEST_FILE).read_text()))
            if started.digest != manifest.digest:
                _delete(work, self.root)
        except (OSError, ValueError):
            if work.exists():
                _delete(work, self.root)
        if not (work / MANIFEST_FILE).is_file():
            work.mkdir(parents=True, exist_ok=True)
            write_private(work / MANIFEST_FILE, _manifest_json(manifest), mode=0o644)
        return work

    @staticmethod
    def _bytes_present(work: Path, manifest: Manifest) -> int:
        n = 0
        for f in manifest.files:
            for p in (work / MODEL_DIR / f.path, work / PARTS / f.path):
                try:
                    n += min(p.stat().st_size, f.size)
                    break
                except OSError:
                    continue
        return n

    def _fetch_file(self, job: _Job, f: ModelFile) -> None:
        """Download one file to parts/, resuming what is there; check its sum; move it to model/."""
        name = job.manifest.name
        part = job.work / PARTS / f.path
        part.parent.mkdir(parents=True, exist_ok=True)
        broken = mismatched = 0
        while True:
            try:
                digest = self._stream_into(job, part, f)
            except _Broken as e:
                broken += 1
                if broken >= self.attempts:
                    raise WeightsError(f"the download of {name} broke off {broken} times ({e}); it resumes "
                                       "where it stopped on the next try", retry=True) from None
                log.warning("download of %s/%s broke off (%s): resuming", name, f.path, e)
                continue
            if digest == f.sha256:
                break
            # Never used: deleted and fetched again whole.
            mismatched += 1
            part.unlink()
            job.progress.set(self._bytes_present(job.work, job.manifest))
            self._check_unchanged(job)
            if mismatched >= self.attempts:
                raise WeightsError(f"{name}/{f.path} from the head's store does not match the SHA-256 in its "
                                   f"manifest ({mismatched} tries): the head's copy is damaged; the operator must add "
                                   f"the model again (`garage-node head weights add {name} DIR`)")
            log.warning("%s/%s did not match its SHA-256: deleted, fetching it again", name, f.path)
        done = job.work / MODEL_DIR / f.path
        done.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, done)

    def _check_unchanged(self, job: _Job) -> None:
        """After a file failed its sum: if the operator re-added the model meanwhile, the file
        came from the new version. Not damage: the next fetch starts over on the new manifest."""
        name = job.manifest.name
        if self._remote_manifest(name, job.weights_path, job.source).digest != job.manifest.digest:
            raise WeightsError(f"the head's copy of {name} changed during the download (the operator added it "
                               "again): the next try fetches the new one", retry=True)

    def _stream_into(self, job: _Job, part: Path, f: ModelFile) -> str:
        """Bring `part` to the file's full size (resuming what it holds) and return the SHA-256
        of the whole; the sum is taken as the bytes arrive (what was there is read once)."""
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:
            part.unlink()
            have = 0
        h = sha256_of(part, CHUNK) if have else hashlib.sha256()
        if have == f.size:
            return h.hexdigest()
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with job.source.get(job.weights_path + modelfiles.FILES + f.path, headers) as resp:
                if resp.status_code == 206 and have:
                    if _range_start(resp) != have:
                        part.unlink(missing_ok=True)
                        raise _Broken("the head answered another range than asked: starting the file over")
                    mode = "ab"
                elif resp.status_code == 200:
                    mode, have, h = "wb", 0, hashlib.sha256()  # the whole file (the server ignored the range)
                elif resp.status_code == 416:
                    part.unlink(missing_ok=True)
                    raise _Broken("the head refused the range asked for: starting the file over")
                else:
                    resp.read()
                    raise _refusal(job.manifest.name, resp.status_code, resp.content)
                with open(part, mode) as out:
                    for chunk in resp.iter_bytes(CHUNK):
                        if job.stop is not None and job.stop.is_set():
                            raise WeightsError(f"the download of {job.manifest.name} was stopped; it resumes where "
                                               "it stopped on the next try", retry=True)
                        if have + len(chunk) > f.size:
                            raise _Broken(f"the head sent more than the {f.size} bytes of {f.path}")
                        out.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        job.progress.add(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
        except httpx.HTTPError as e:
            raise _Broken(_reason(e)) from None
        if have != f.size:
            raise _Broken(f"{f.path}: {have} of {f.size} bytes arrived")
        return h.hexdigest()

    def _swap_in(self, name: str, work: Path) -> None:
        """The download becomes the held model, by renames (an older version steps aside first)."""
        dest = self.root / name
        old = None
        if dest.exists():
            old = self.root / INCOMING / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        shutil.rmtree(work / PARTS, ignore_errors=True)
        os.rename(work, dest)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # -- room

    def _make_room(self, need: int, keep: set[str], name: str) -> None:
        """Evict until `need` more bytes fit: first what no engine can use (interrupted downloads
        of other models, damaged copies), then held models, least recently used first; never a
        held model in `keep`."""
        candidates: list[tuple[int, float, Path, str]] = []
        incoming = self.root / INCOMING
        if incoming.is_dir():
            for p in incoming.iterdir():
                if p.name != name:
                    candidates.append((0, _mtime(p), p, f"an interrupted download of {p.name}"))
        held = {m.name: m for m in self.models()}
        for p in self.root.iterdir():
            if modelfiles.MODEL_NAME.match(p.name) and p.name not in held:
                candidates.append((0, _mtime(p), p, f"a damaged copy of {p.name}"))
        for m in held.values():
            if m.name not in keep:
                candidates.append((1, m.last_used, self.root / m.name, m.name))
        candidates.sort(key=lambda c: (c[0], c[1]))
        while self._room() < need and candidates:
            _, _, path, what = candidates.pop(0)
            log.info("weights: evicting %s to make room for %s", what, name)
            _delete(path, self.root)
        room = self._room()
        if room < need:
            in_use = ", ".join(sorted(keep & set(self.held())))
            kept = f" (kept, in use: {in_use})" if in_use else ""
            cap = " or raise the cap on model storage" if self.max_mib is not None else ""
            raise WeightsError(f"no room for {name}: it needs {_mib(need)} MiB more, {_mib(max(room, 0))} MiB are free "
                               f"for models{kept}; free space on the data partition{cap}")

    def _room(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        room = shutil.disk_usage(self.root).free - self.reserve_mib * MIB
        if self.max_mib is not None:
            room = min(room, self.max_mib * MIB - _du(self.root))
        return room


@dataclass
class _Job:
    """One model's download: what, from where, and who watches."""

    manifest: Manifest
    weights_path: str
    source: Source
    progress: _ProgressReporter
    stop: threading.Event | None
    work: Path = Path()


class _Broken(Exception):
    """A download stopped before the file was whole: resumed."""


class _ProgressReporter:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done, self.last = progress, max(total, 1), 0, -1

    def set(self, done: int) -> None:
        self.done = done
        self._report()

    def add(self, n: int) -> None:
        self.done += n
        self._report()

    def _report(self) -> None:
        pct = min(100, self.done * 100 // self.total)
        if pct != self.last:
            self.last = pct
            _report(self.progress, pct)


def _report(progress: Progress | None, pct: int) -> None:
    if progress is not None:
        try:
            progress(pct)
        except Exception:  # a display's failure must not fail the download
            log.exception("weights progress callback failed")


def _refusal(name: str, status: int, body: bytes) -> WeightsError:
    try:
        message = str(json.loads(body).get("message", ""))[:300]
    except (ValueError, AttributeError):
        message = ""
    if status == 404:
        return WeightsError(f"the head's model store does not hold {name}: {message or 'not found'}")
    if status in (401, 403):
        return WeightsError(f"the head refused this node's request for {name} ({status}): {message}")
    return WeightsError(f"the head's model store answered {status} for {name}: {message or 'no reason given'}",
                        retry=status >= 500)


def _range_start(resp: httpx.Response) -> int:
    # "bytes 100-199/200"
    try:
        return int(resp.headers.get("content-range", "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _manifest_json(m: Manifest) -> bytes:
    return (json.dumps(encode(m), indent=1) + "\n").encode()


def _delete(path: Path, root: Path) -> None:
    """Remove a model's directory: renamed aside first, so it stops counting as held at once."""
    aside = root / INCOMING / f".old-{path.name}-{uuid.uuid4().hex[:8]}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _du(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for fname in files:
            try:
                total += os.lstat(os.path.join(dirpath, fname)).st_size
            except OSError:
                pass
    return total


def _mib(n: int) -> int:
    return -(-n // MIB)


def _reason(e: httpx.HTTPError) -> str:
    # httpx's messages hold no request headers (the credential) or bodies; keep them short.
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]
