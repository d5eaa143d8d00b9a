#!/usr/bin/python3
"""Write a release of the stick beside a freshly built A/B image (build-image.sh --signing-key).

    make-release.py IMAGE VERSION VARIANT AGENT_VERSION MANIFEST WHEELS_DIR EPOCH RELEASE_DIR

IMAGE is the raw disk mkosi wrote; its root partition (label garage-root_VERSION) and its UKI
(ESP /EFI/Linux/garage-node_VERSION+3.efi) are copied out under the names the stick's
/usr/lib/sysupdate.d/ transfers expect, release.json describes them
(garage_node/core/releasefiles.py's ReleaseManifest), SHA256SUMS lists all three. Signing
SHA256SUMS stays in build-image.sh (it holds the key). Only the standard library: it runs with
the host's /usr/bin/python3 before any venv exists. Copies are sparse: the root partition is
mostly free space.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SECTOR = 512
CHUNK = 1 << 20
TRIES = 3  # the flashed image's UKI carries a try counter (image/mkosi.extra/etc/kernel/tries)


def partitions(image: Path) -> list[dict]:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    size = table.get("sectorsize", SECTOR)
    return [{**p, "offset": p["start"] * size, "bytes": p["size"] * size} for p in table["partitions"]]


def copy_sparse(src: Path, offset: int, length: int, dest: Path) -> str:
    """Copy `length` bytes at `offset` of src into dest, leaving holes where the source has
    holes or zeros; returns the copy's SHA-256. The holes of the (sparse) image are skipped with
    SEEK_DATA/SEEK_HOLE instead of being read."""
    digest = hashlib.sha256()
    zero = bytes(CHUNK)
    end = offset + length
    with src.open("rb") as f, dest.open("wb") as out:
        fd = f.fileno()
        pos = offset
        while pos < end:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
            except OSError:  # ENXIO: only a hole up to the end of the file
                data = end
            while pos < data:  # a hole: zeros in the hash, a hole in the copy
                n = min(CHUNK, data - pos)
                digest.update(zero[:n])
                pos += n
            if pos >= end:
                break
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            f.seek(pos)
            while pos < hole:
                block = f.read(min(CHUNK, hole - pos))
                if not block:
                    raise SystemExit(f"make-release: {src} ends inside the partition being copied")
                digest.update(block)
                if block != zero[:len(block)]:
                    out.seek(pos - offset)
                    out.write(block)
                pos += len(block)
        out.truncate(length)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def python_version(manifest: Path) -> str:
    """major.minor of the image's python3 package (mkosi's manifest: "3.11.2-1+b1")."""
    packages = json.loads(manifest.read_text())["packages"]
    version = next(p["version"] for p in packages if p["name"] == "python3")
    m = re.match(r"(\d+\.\d+)", version)
    if not m:
        raise SystemExit(f"make-release: cannot read python3's version from {version!r}")
    return m[1]


def ray_version(wheels: Path) -> str:
    found = sorted(p.name for p in wheels.glob("ray-*.whl"))
    if len(found) != 1:
        raise SystemExit(f"make-release: expected one ray wheel in {wheels}, found {found}")
    return found[0].split("-")[1]


def main(argv: list[str]) -> int:
    image, version, variant, agent, manifest, wheels, epoch, out = argv
    img, dest = Path(image), Path(out)
    dest.mkdir(parents=True, exist_ok=False)
    parts = {p.get("name", ""): p for p in partitions(img)}
    root = parts.get(f"garage-root_{version}")
    esp = parts.get("ESP")
    if root is None or esp is None:
        raise SystemExit(f"make-release: {img} has no partition garage-root_{version} or ESP "
                         f"(found: {', '.join(sorted(parts))})")
    root_name, uki_name = f"garage-node_{version}.root.raw", f"garage-node_{version}.efi"
    sums = {root_name: copy_sparse(img, root["offset"], root["bytes"], dest / root_name)}
    # The UKI out of the FAT ESP with mtools (no loop mount: the build host may lack vfat).
    subprocess.run(["mcopy", "-n", "-i", f"{img}@@{esp['offset']}", f"::/EFI/Linux/garage-node_{version}+{TRIES}.efi",
                    str(dest / uki_name)], check=True)
    sums[uki_name] = sha256(dest / uki_name)
    release = {
        "format": 1,
        "version": version,
        "variant": variant,
        "python": python_version(Path(manifest)),
        "ray": ray_version(Path(wheels)),
        "root": root_name,
        "uki": uki_name,
        "agent": agent,
        "built_at": datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).isoformat(),
    }
    (dest / "release.json").write_text(json.dumps(release, indent=2) + "\n")
    sums["release.json"] = sha256(dest / "release.json")
    (dest / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sorted(sums.items())))
    print(f"build-image: release {version} ({variant}, Python {release['python']}, Ray {release['ray']}) in {dest}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 9:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1:]))
