"""Small file helpers with the guarantees identity and state need."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path, chunk: int = 1 << 20) -> Any:
    """The SHA-256 of a file's bytes (read in chunks: model files are gigabytes); the hash
    object, so a caller may go on feeding it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h


def copy_summed(src: Path, dest: Path, on_chunk: Callable[[int], None] | None = None,
                chunk: int = 1 << 20) -> tuple[int, str]:
    """Copy `src` to `dest` (0644, synced) and hash what was written on the way: (bytes, SHA-256
    hex). One read of the source for both, however large. `on_chunk(n)` after each chunk."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while data := fin.read(chunk):
            fout.write(data)
            h.update(data)
            size += len(data)
            if on_chunk is not None:
                on_chunk(len(data))
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dest, 0o644)
    return size, h.hexdigest()


def write_json(path: Path, value: Any, mode: int = 0o600) -> None:
    write_private(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
