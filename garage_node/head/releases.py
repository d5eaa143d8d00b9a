"""The head's releases of the stick's OS: the operator's signed builds, checked once at the head
and served to the region's PCs (head/api/releases.py), so a region downloads a release once.

On disk, under <state_dir>/releases:

    keys/trusted.gpg                 the operator's public signing keys (head/gpg.py), the keyring
                                     the stick's systemd-sysupdate trusts too
    versions/<version>/...           a stored release: its files, SHA256SUMS, SHA256SUMS.gpg
    versions/<version>/.stored.json  when it was added and by whose key it was signed

`garage-node head release add DIR` checks, in this order, before anything is kept: the
signature of SHA256SUMS against the trusted keys; that SHA256SUMS lists every file of DIR and
only those; release.json (core/releasefiles.py), and that its Ray and Python versions are the
head's (Ray needs them the same across the region: a release that changed them would leave its
PCs out of Ray); then it copies the files, summing the bytes written, and renames the copy into
place only when every sum matched. A version is stored once: adding it again with the same
SHA256SUMS does nothing, with another it is refused (a version names one build, for ever).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from garage_node.core import releasefiles as rf
from garage_node.core.fsutil import copy_summed, fsync_dir, write_private
from garage_node.core.raycmd import local_versions
from garage_node.core.wire import Versions
from garage_node.head import gpg

CHUNK = 1024 * 1024
STORED = ".stored.json"
_TEMP = ".adding-"


class ReleaseError(Exception):
    """A release was refused or not found; the message says why and what to do."""


@dataclass(frozen=True)
class StoredRelease:
    version: str
    variant: str
    python: str
    ray: str
    agent: str
    files: int
    bytes: int
    signer: str  # the signing key's fingerprint
    added_at: float
    path: str  # where the control API serves it


def releases_root(state_dir: Path) -> Path:
    return state_dir / "releases"


class ReleaseStore:
    def __init__(self, root: Path, versions: Callable[[], Versions] = local_versions) -> None:
        self.root = root
        self.keyring = root / "keys" / "trusted.gpg"
        self.versions_dir = root / "versions"
        self._head_versions = versions

    # -- keys

    def trust_key(self, key_file: Path) -> list[gpg.PublicKey]:
        try:
            data = key_file.read_bytes()
        except OSError as e:
            raise ReleaseError(f"{key_file}: cannot read ({e.strerror or e})") from None
        self.keyring.parent.mkdir(parents=True, exist_ok=True)
        try:
            return gpg.add_to_keyring(self.keyring, data)
        except gpg.GpgError as e:
            raise ReleaseError(f"{key_file}: {e}") from None

    def trusted_keys(self) -> list[gpg.PublicKey]:
        return gpg.keyring_keys(self.keyring)

    # -- reading (the API, `head release list`, the rollout)

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(p.name for p in self.versions_dir.iterdir()
                      if rf.VERSION.match(p.name) and (p / STORED).is_file())

    def has(self, version: str) -> bool:
        return bool(rf.VERSION.match(version)) and (self.versions_dir / version / STORED).is_file()

    def release(self, version: str) -> StoredRelease | None:
        if not self.has(version):
            return None
        d = self.versions_dir / version
        try:
            m = rf.ReleaseManifest.parse((d / rf.MANIFEST).read_bytes())
            sums = rf.parse_sums((d / rf.SUMS).read_bytes())
            stored = json.loads((d / STORED).read_text())
        except (OSError, ValueError):
            return None  # damaged: not listed, not served
        size = sum((d / name).stat().st_size for name in sums if (d / name).is_file())
        return StoredRelease(m.version, m.variant, m.python, m.ray, m.agent, len(sums), size,
                             str(stored.get("signer", "")), float(stored.get("added_at", 0.0)), rf.release_path(version))

    def releases(self) -> list[StoredRelease]:
        return [r for r in (self.release(v) for v in self.versions()) if r is not None]

    def file_path(self, version: str, name: str) -> Path | None:
        """A stored release's file on disk; None unless it is SHA256SUMS, its signature or a file
        SHA256SUMS lists, so nothing else on the head can be named."""
        if not self.has(version):
            return None
        d = self.versions_dir / version
        if name in (rf.SUMS, rf.SIGNATURE):
            return d / name
        try:
            listed = rf.parse_sums((d / rf.SUMS).read_bytes())
        except (OSError, ValueError):
            return None
        return d / name if name in listed else None

    # -- adding

    def add(self, src: Path) -> tuple[StoredRelease, bool]:
        """Check and store the release in directory `src`: (the release, whether it was new).
        Raises ReleaseError, with nothing stored, for any check that fails."""
        sums_raw, sums = self._signed_sums(src)
        manifest = self._manifest(src, sums)
        version = manifest.version
        dest = self.versions_dir / version
        if self.has(version):
            if (dest / rf.SUMS).read_bytes() == sums_raw:
                stored = self.release(version)
                if stored is not None:
                    return stored, False
            raise ReleaseError(f"release {version} is already stored, with other files: a version names one build "
                               "for ever. Build again with a new version")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        need = sum((src / name).stat().st_size for name in sums)
        free = shutil.disk_usage(self.versions_dir).free
        if need > free:
            raise ReleaseError(f"release {version} needs {-(-need // 2**20)} MiB but {self.versions_dir} has "
                               f"{free // 2**20} MiB free: free some space first")
        tmp = self.versions_dir / f"{_TEMP}{version}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            for name in (rf.SUMS, rf.SIGNATURE):
                shutil.copyfile(src / name, tmp / name)
            if (tmp / rf.SUMS).read_bytes() != sums_raw:
                raise ReleaseError(f"{src / rf.SUMS} changed while it was being added: add it again")
            # Checked again on the copies: the bytes kept are the bytes whose signature counts.
            signer = self._verify(tmp / rf.SUMS, tmp / rf.SIGNATURE)
            for name, want in sorted(sums.items()):
                got = _copy_summed(src / name, tmp / name)
                if got != want:
                    raise ReleaseError(f"{name}: its SHA-256 is {got[:16]}… but SHA256SUMS says {want[:16]}…: the file "
                                       "was changed or damaged after the release was signed; nothing was stored")
            write_private(tmp / STORED, (json.dumps({"signer": signer, "added_at": time.time()}) + "\n").encode(),
                          mode=0o644)
            fsync_dir(tmp)
            os.rename(tmp, dest)
            fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        stored = self.release(version)
        assert stored is not None
        return stored, True

    def _verify(self, sums: Path, sig: Path) -> str:
        try:
            return gpg.verify_detached(self.keyring, sums, sig)
        except gpg.GpgError as e:
            raise ReleaseError(str(e)) from None

    def _signed_sums(self, src: Path) -> tuple[bytes, dict[str, str]]:
        if not src.is_dir():
            raise ReleaseError(f"{src} is not a directory: give the release directory build-image.sh wrote "
                               f"(with {rf.MANIFEST}, {rf.SUMS} and {rf.SIGNATURE})")
        for name in (rf.SUMS, rf.SIGNATURE, rf.MANIFEST):
            if not (src / name).is_file():
                raise ReleaseError(f"{src} has no {name}: a release directory holds {rf.MANIFEST}, the root and UKI "
                                   f"files, {rf.SUMS} and its signature {rf.SIGNATURE}")
        self._verify(src / rf.SUMS, src / rf.SIGNATURE)
        raw = (src / rf.SUMS).read_bytes()
        try:
            sums = rf.parse_sums(raw)
        except ValueError as e:
            raise ReleaseError(str(e)) from None
        present = {p.name for p in src.iterdir()} - {rf.SUMS, rf.SIGNATURE}
        if rf.MANIFEST not in sums:
            raise ReleaseError(f"{rf.SUMS} does not list {rf.MANIFEST}: the manifest must be signed too")
        missing = sorted(set(sums) - present)
        if missing:
            raise ReleaseError(f"{rf.SUMS} lists {', '.join(missing[:5])}, which {src} does not hold")
        unsigned = sorted(present - set(sums))
        if unsigned:
            raise ReleaseError(f"{src} holds {', '.join(unsigned[:5])}, which {rf.SUMS} does not list: every file of a "
                               "release must be signed; remove it or build the release again")
        for name in sums:
            if not (src / name).is_file():
                raise ReleaseError(f"{src / name} is not a regular file")
        return raw, sums

    def _manifest(self, src: Path, sums: dict[str, str]) -> rf.ReleaseManifest:
        raw = (src / rf.MANIFEST).read_bytes()
        if hashlib.sha256(raw).hexdigest() != sums[rf.MANIFEST]:
            raise ReleaseError(f"{rf.MANIFEST}: its SHA-256 differs from {rf.SUMS}: it was changed after signing")
        try:
            m = rf.ReleaseManifest.parse(raw)
        except ValueError as e:
            raise ReleaseError(str(e)) from None
        for role, name in (("root", m.root), ("uki", m.uki)):
            if name not in sums:
                raise ReleaseError(f"{rf.MANIFEST} names {name!r} as the {role}, but {rf.SUMS} does not list it")
        head = self._head_versions()
        problems = []
        if m.ray != head.ray:
            problems.append(f"it carries Ray {m.ray} but the head runs Ray {head.ray}")
        if m.python != head.python:
            problems.append(f"it carries Python {m.python} but the head runs Python {head.python}")
        if problems:
            # Ray refuses a worker whose Ray or Python differs from the head's: every PC that
            # took this release would drop out of the region's Ray.
            raise ReleaseError(f"release {m.version} is refused: {'; '.join(problems)}. Ray needs the same versions "
                               "on every machine of a region: build the stick with the head's versions, or move the "
                               "head to the new ones first")
        return m


def _copy_summed(src: Path, dest: Path) -> str:
    return copy_summed(src, dest, chunk=CHUNK)[1]
