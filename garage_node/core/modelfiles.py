"""The model store's contract between the head (head/modelstore.py, which keeps and serves a
region's model weights) and the PCs (node/weights.py, which fetch and keep them): model names,
file paths inside a model, the manifest that lists a model's files with their SHA-256 sums, and
where on the control API a model's files are served.

Here, in core, because both sides read it and neither may import the other.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from garage_node.core.wire import WireError, decode

# A catalog name as in configs/models.toml ("qwen2.5-7b", "tiny-llama-test"). It becomes a
# directory name on the head and on every PC and a segment of a URL, so it is kept to letters,
# digits, '.', '_' and '-', starting with a letter or digit (never "." or ".."). 80 characters:
# the store's path for it ("/v1/store/<name>/") still fits Assignment.weights_path (96).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}\Z")  # \Z: "$" would let a final newline through
NAME_RULE = "1-80 characters of letters, digits, '.', '_' and '-', starting with a letter or digit"

# A file's path inside a model: relative, '/'-separated segments of the same characters (plus
# '+', '=' and ','), none of them empty, "." or "..", none starting with '.' (hidden files such
# as a download tool's .cache/ are not part of a model).
_SEGMENT = re.compile(r"^[A-Za-z0-9_+=,-][A-Za-z0-9._+=,-]{0,199}\Z")
MAX_PATH = 512
MAX_FILES = 10_000

STORE_PREFIX = "/v1/store/"
MANIFEST = "manifest"   # GET <weights_path>manifest
FILES = "files/"        # GET <weights_path>files/<path>
# Store requests carry the node's credential as `Authorization: Bearer ...`, as heartbeats do;
# the node id, which a heartbeat has in its URL, goes in this header.
NODE_HEADER = "X-Garage-Node"


def check_name(name: str) -> str:
    """`name` if it is a valid model name; ValueError saying what a name may be otherwise."""
    if not MODEL_NAME.match(name):
        raise ValueError(f"{name[:100]!r} is not a valid model name: use {NAME_RULE} (a catalog name, e.g. qwen2.5-7b)")
    return name


def check_path(path: str) -> str:
    """`path` if it is a safe file path inside a model (no traversal, no absolute path)."""
    segments = path.split("/")
    if len(path) > MAX_PATH or not all(_SEGMENT.match(s) for s in segments):
        raise ValueError(f"{path[:100]!r} is not a file path inside a model (relative, '/'-separated, no '..', "
                         "no hidden files)")
    return path


def weights_path(name: str) -> str:
    """Where the head's control API serves model `name` (Assignment.weights_path)."""
    return f"{STORE_PREFIX}{check_name(name)}/"


@dataclass(frozen=True)
class ModelFile:
    path: str      # relative to the model's directory, '/'-separated
    size: int      # bytes
    sha256: str    # lowercase hex


@dataclass(frozen=True)
class Manifest:
    """A model's files as the head stores them. `digest` identifies this version of the model
    (a SHA-256 over every file's path, size and sum): re-adding changed weights changes it."""

    name: str
    files: list[ModelFile] = field(default_factory=list)
    digest: str = ""
    added_at: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def build(cls, name: str, files: list[ModelFile], added_at: float = 0.0) -> Manifest:
        files = sorted(files, key=lambda f: f.path)
        return cls(name=name, files=files, digest=files_digest(files), added_at=added_at)

    def check(self) -> Manifest:
        """This manifest if it is well formed (name, paths, sizes, sums, digest); ValueError otherwise."""
        check_name(self.name)
        if not self.files or len(self.files) > MAX_FILES:
            raise ValueError(f"the manifest of {self.name} lists {len(self.files)} files (1 to {MAX_FILES} expected)")
        seen: set[str] = set()
        for f in self.files:
            check_path(f.path)
            if f.path in seen or f.size < 0 or not re.fullmatch(r"[0-9a-f]{64}", f.sha256):
                raise ValueError(f"the manifest of {self.name} has a bad entry for {f.path!r}")
            seen.add(f.path)
        # A file that is also a directory ("a" and "a/b") cannot be laid out on disk.
        for p in seen:
            parts = p.split("/")
            if any("/".join(parts[:i]) in seen for i in range(1, len(parts))):
                raise ValueError(f"the manifest of {self.name} lists both a file and a directory named like {p!r}")
        if files_digest(sorted(self.files, key=lambda f: f.path)) != self.digest:
            raise ValueError(f"the manifest of {self.name} does not match its digest")
        return self

    @classmethod
    def parse(cls, data: object) -> Manifest:
        """A manifest from parsed JSON, checked; ValueError (WireError) with what is wrong."""
        try:
            return decode(data, cls).check()
        except WireError as e:
            raise ValueError(f"not a model manifest: {e}") from None


def files_digest(files: list[ModelFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.sha256}\n".encode())
    return h.hexdigest()
