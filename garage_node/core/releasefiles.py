"""A release of the USB stick's OS: the contract between what builds it (build-image.sh, for
the A/B stick), the head that keeps and serves it (head/releases.py) and the PCs that fetch it
(systemd-sysupdate on the stick). Here, in core, because all of them read it.

A release is one flat directory:

    release.json                     this module's ReleaseManifest: version, variant, the Python
                                     and Ray versions inside, and which file is the root and the UKI
    garage-node_<version>.root.raw   the root partition's image (mkosi SplitArtifacts=yes); any name
    garage-node_<version>.efi        the unified kernel image; any name
    ...                              more payload files (a verity partition), each listed below
    SHA256SUMS                       `sha256sum` lines ("<hex>  <name>" or "<hex> *<name>") for every
                                     file above, release.json included (mkosi Checksum=yes writes it)
    SHA256SUMS.gpg                   a detached OpenPGP signature of SHA256SUMS by the operator's key
                                     (mkosi Sign=yes; what systemd-sysupdate verifies on the PC)

Every payload file's name carries the version (sysupdate finds versions in file names with its
`@v` patterns, and a file of another version slipped into the directory must not pass). The
version is what sysupdate's patterns and systemd-boot's entry names can hold: letters, digits,
'.' and '-'; no '_' (the patterns' separator) and no '+' (systemd-boot's try counter, "+3-0").

Only the standard library and core.wire: the node side may read it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from garage_node.core.wire import ShortText, WireError, decode

MANIFEST = "release.json"
SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.gpg"
FORMAT = 1

VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.-]{0,63}\Z")  # \Z: "$" would let a final newline through
VERSION_RULE = "1-64 letters, digits, '.' and '-', starting with a letter or digit (no '_' or '+')"
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}\Z")
VARIANTS = ("base", "nvidia")
MAX_FILES = 16
MAX_SUMS_BYTES = 64 * 1024  # a release lists a handful of files: a bigger SHA256SUMS is not one
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](\S.*)\Z")

# The control API serves a stored release's files here (head/api/releases.py), with the node's
# credential as the model store's files are.
RELEASES_PREFIX = "/v1/releases/"


def check_version(version: str) -> str:
    if not VERSION.match(version):
        raise ValueError(f"{version[:80]!r} is not a release version: use {VERSION_RULE}, e.g. 2026.12.1")
    return version


def check_file_name(name: str) -> str:
    if not FILE_NAME.match(name) or name in (SUMS, SIGNATURE):
        raise ValueError(f"{name[:80]!r} is not a release file name (one name, no '/', letters, digits, '.', '_', "
                         "'+' and '-')")
    return name


def release_path(version: str) -> str:
    """Where the control API serves release `version` (sysupdate's source URL ends here)."""
    return f"{RELEASES_PREFIX}{check_version(version)}/"


@dataclass(frozen=True)
class ReleaseManifest:
    """release.json. `python` is major.minor and `ray` the exact version: Ray needs both the same
    on every node of a region, so a release that would change them is refused by the head."""

    format: int
    version: ShortText
    variant: ShortText  # "base" or "nvidia": which stick it updates
    python: ShortText
    ray: ShortText
    root: ShortText  # the root partition's image file
    uki: ShortText  # the unified kernel image
    agent: ShortText = ""  # garage-node's own version inside
    built_at: str = ""  # ISO 8601, for people

    def check(self) -> ReleaseManifest:
        if self.format != FORMAT:
            raise ValueError(f"{MANIFEST} has format {self.format}; this garage-node reads format {FORMAT} "
                             "(update the head first)")
        check_version(self.version)
        if self.variant not in VARIANTS:
            raise ValueError(f"{MANIFEST}: variant must be one of {', '.join(VARIANTS)}")
        for role, name in (("root", self.root), ("uki", self.uki)):
            check_file_name(name)
            if self.version not in name:
                raise ValueError(f"{MANIFEST}: the {role} file {name!r} does not carry the version {self.version} "
                                 "in its name (sysupdate finds versions in file names)")
        if self.root == self.uki:
            raise ValueError(f"{MANIFEST}: root and uki name the same file")
        return self

    @classmethod
    def parse(cls, raw: bytes) -> ReleaseManifest:
        try:
            return decode(json.loads(raw), cls).check()
        except (ValueError, WireError) as e:
            raise ValueError(f"{MANIFEST} is not a release manifest: {e}") from None


def parse_sums(raw: bytes) -> dict[str, str]:
    """SHA256SUMS as {file name: lowercase hex}; ValueError naming the line that is wrong."""
    if len(raw) > MAX_SUMS_BYTES:
        raise ValueError(f"{SUMS} is {len(raw)} bytes: a release lists a handful of files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{SUMS} is not UTF-8 text") from None
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUM_LINE.match(line)
        if m is None:
            raise ValueError(f"{SUMS} line {n} is not '<sha256>  <file name>'")
        name = m[2]
        try:
            check_file_name(name)
        except ValueError as e:
            raise ValueError(f"{SUMS} line {n}: {e}") from None
        if name in out:
            raise ValueError(f"{SUMS} lists {name!r} twice")
        out[name] = m[1].lower()
    if not out:
        raise ValueError(f"{SUMS} lists no file")
    if len(out) > MAX_FILES:
        raise ValueError(f"{SUMS} lists {len(out)} files; a release has at most {MAX_FILES}")
    return out
