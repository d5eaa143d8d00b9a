"""The head as the region's model store: model weights kept once at the head and served to the
PCs by the control API (head/api/store.py: HTTPS, the heartbeats' address and credential), so a region downloads a model from the internet once,
not once per PC.

On disk, under the store's root (<state_dir>/models, so a head restart keeps it):

    <root>/<name>/manifest.json   the model's files with size and SHA-256 (core/modelfiles.py)
    <root>/<name>/files/...       the files themselves

A model is added by copying a local directory (`garage-node head weights add NAME DIR`): the
copy is written under a temporary name beside the models and renamed into place only when
every file is copied and summed, so a reader (the API, another command) sees the old model or
the new one, never half of one. The sums are computed while copying, from the bytes written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from garage_node.core import modelfiles
from garage_node.core.fsutil import copy_summed, fsync_dir, sha256_of, write_private
from garage_node.core.modelfiles import Manifest, ModelFile, check_name, check_path
from garage_node.core.wire import encode

CHUNK = 1024 * 1024
MANIFEST_FILE = "manifest.json"
FILES_DIR = "files"
# What a model directory must hold to be served by vLLM from a local directory.
REQUIRED_FILE = "config.json"
_TEMP = ".adding-"
_OLD = ".removing-"


def store_root(state_dir: Path) -> Path:
    """Where the head keeps its model store: in its state directory, so a restart keeps it."""
    return state_dir / "models"


class StoreError(Exception):
    """A model could not be added or found; the message says what to do."""


@dataclass(frozen=True)
class StoredModel:
    name: str
    files: int
    bytes: int
    digest: str
    added_at: float
    weights_path: str


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    # -- reading (the API, `head weights list`)

    def names(self) -> list[str]:
        """The models held, complete (a model being added or removed is not listed)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if modelfiles.MODEL_NAME.match(p.name) and (p / MANIFEST_FILE).is_file())

    def manifest(self, name: str) -> Manifest | None:
        """Model `name`'s manifest; None if the store does not hold it (or `name` is not a name)."""
        if not modelfiles.MODEL_NAME.match(name):
            return None
        try:
            data = json.loads((self.root / name / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        try:
            return Manifest.parse(data)
        except ValueError:
            return None  # not written by this store (or damaged): not served

    def file_path(self, name: str, path: str) -> tuple[Path, ModelFile] | None:
        """The file `path` of model `name` on disk, with its manifest entry; None unless the
        manifest lists it, so nothing but a model's own files can ever be named."""
        m = self.manifest(name)
        if m is None:
            return None
        entry = next((f for f in m.files if f.path == path), None)
        if entry is None:
            return None
        return self.root / name / FILES_DIR / entry.path, entry

    def models(self) -> list[StoredModel]:
        out = []
        for name in self.names():
            m = self.manifest(name)
            if m is not None:
                out.append(StoredModel(name, len(m.files), m.total_bytes, m.digest, m.added_at, self.weights_path(name)))
        return out

    def verify(self, name: str) -> list[str]:
        """Read every file of model `name` again: the paths whose size or SHA-256 no longer match
        its manifest (empty: all sound). Raises StoreError if the store does not hold it."""
        m = self.manifest(name)
        if m is None:
            raise StoreError(f"the store does not hold {name[:100]!r} (see `garage-node head weights list`)")
        bad = []
        for f in m.files:
            try:
                sound = sha256_of(self.root / name / FILES_DIR / f.path, CHUNK).hexdigest() == f.sha256
            except OSError:
                sound = False
            if not sound:
                bad.append(f.path)
        return bad

    @staticmethod
    def weights_path(name: str) -> str:
        """The path prefix on the control API a PC is given (Assignment.weights_path)."""
        return modelfiles.weights_path(name)

    # -- changing (`head weights add/remove`)

    def add(self, name: str, src_dir: Path, progress: Callable[[int, int], None] | None = None) -> Manifest:
        """Copy the model in `src_dir` into the store as `name`, replacing a model of that name.
        `progress(bytes_done, bytes_total)` is called as the copy goes. Raises StoreError."""
        try:
            check_name(name)
        except ValueError as e:
            raise StoreError(str(e)) from None
        sources = _model_files(src_dir)
        total = sum(size for _, _, size in sources)
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if total > free:
            raise StoreError(f"{src_dir} holds {_mib(total)} MiB but the store at {self.root} has {_mib(free)} MiB "
                             "free: free some space (or remove a model with `head weights remove`)")
        tmp = self.root / f"{_TEMP}{name}-{uuid.uuid4().hex[:8]}"
        try:
            files = _copy_in(sources, tmp / FILES_DIR, total, progress)
            manifest = Manifest.build(name, files, added_at=time.time())
            write_private(tmp / MANIFEST_FILE, (json.dumps(encode(manifest), indent=1) + "\n").encode(), mode=0o644)
            self._swap_in(name, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def remove(self, name: str) -> bool:
        """Remove model `name`; False if the store did not hold it."""
        if not modelfiles.MODEL_NAME.match(name) or not (self.root / name).exists():
            return False
        old = self.root / f"{_OLD}{name}-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / name, old)  # gone for readers at once; the delete may take a while
        shutil.rmtree(old, ignore_errors=True)
        return True

    def _swap_in(self, name: str, tmp: Path) -> None:
        dest = self.root / name
        old = None
        if dest.exists():
            # A directory cannot be renamed over a non-empty one: the old one steps aside first
            # (for that instant the model is not listed; a PC's download retries).
            old = self.root / f"{_OLD}{name}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _model_files(src_dir: Path) -> list[tuple[Path, str, int]]:
    """(source file, path inside the model, size) of every file of the model in `src_dir`.
    Symbolic links are followed (a Hugging Face snapshot directory is links into its blobs);
    hidden files and directories are left out (a download tool's .cache/, .gitattributes)."""
    if not src_dir.exists():
        raise StoreError(f"{src_dir} does not exist: give the directory that holds the model's files")
    if not src_dir.is_dir():
        raise StoreError(f"{src_dir} is not a directory: give the directory that holds the model's files "
                         f"({REQUIRED_FILE}, the weights, the tokenizer)")
    out = []
    for dirpath, dirnames, filenames in os.walk(src_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            src = Path(dirpath) / fname
            rel = src.relative_to(src_dir).as_posix()
            try:
                check_path(rel)
            except ValueError as e:
                raise StoreError(f"{src}: {e}; rename it or leave it out of the model directory") from None
            if not src.is_file():
                raise StoreError(f"{src} is not a regular file (a broken link?): fix or remove it")
            out.append((src, rel, src.stat().st_size))
    if not out:
        raise StoreError(f"{src_dir} is empty: give the directory that holds the model's files")
    if not (src_dir / REQUIRED_FILE).is_file():
        raise StoreError(f"{src_dir} has no {REQUIRED_FILE}: give the model's own directory (the one holding "
                         f"{REQUIRED_FILE}, e.g. a Hugging Face snapshot directory), not the one above it")
    if len(out) > modelfiles.MAX_FILES:
        raise StoreError(f"{src_dir} holds {len(out)} files; a model may have at most {modelfiles.MAX_FILES}")
    return out


def _copy_in(sources: list[tuple[Path, str, int]], dest: Path, total: int,
             progress: Callable[[int, int], None] | None) -> list[ModelFile]:
    files = []
    done = 0

    def copied(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)
    for src, rel, _ in sources:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        size, sha = copy_summed(src, target, copied, CHUNK)
        files.append(ModelFile(rel, size, sha))
    return files


def _mib(n: int) -> int:
    return -(-n // (1024 * 1024))
