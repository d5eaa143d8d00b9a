"""Building the USB image and booting it in QEMU: what the image tests (tests/image/) share.

build_image() runs build-image.sh into out/test/ (reused when no input changed); VM boots a
copy of the image inside a testbed's namespace; parse_boot_log() reads the boot marker's lines
from a serial log (see tests/image/test_image.py for their format).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from testing.region import sh, wait_for

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "test"
TOKEN = "gn1.imagetest-7f3c9a1e5b2d4c60a8e9f1d2c3b4a596-notreal"
PSK = "imagetest-wifi-secret-91d2"
NODE_NAME = "garage-test-node"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFH8/63YlwNL179vMsqLBD1onNWleKW3fv39PRLU4Tsj garage-image-test"
GARAGE_TOML = f"""\
[node]
join_token = "{TOKEN}"
name = "{NODE_NAME}"
region = "test"

[wifi]
ssid = "garage-test-wifi"
psk = "{PSK}"
country = "DE"

[ssh]
authorized_keys = ["{SSH_KEY}"]
"""
BUILD_TIMEOUT = 45 * 60
JOIN_TIMEOUT = int(os.environ.get("GARAGE_IMAGE_JOIN_TIMEOUT", "1200"))


def image_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def build_image(variant: str, garage_toml: str, conf_name: str) -> tuple[Path, str]:
    """build-image.sh for a variant into out/test/ (reused when no input changed); returns
    the raw image and the build's output."""
    OUT.mkdir(parents=True, exist_ok=True)
    conf = OUT / conf_name
    if not conf.exists() or conf.read_text() != garage_toml:
        conf.write_text(garage_toml)
    img = OUT / f"garage-node-{image_version()}-{variant}-amd64.img"
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "build-image.sh"), "--variant", variant, "--config", str(conf),
         "--output", str(img), "--no-compress", "--if-changed"],
        cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )
    sys.stdout.write(proc.stdout[-4000:])
    assert proc.returncode == 0, f"build-image.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"{variant} image build (or reuse): {time.monotonic() - t0:.1f} s")
    assert img.exists()
    return img, proc.stdout + proc.stderr


def release_key(directory: Path) -> Path:
    """A throwaway OpenPGP release key (secret, exported without a passphrase) for the update
    tests, kept in `directory` so that the versions built with it are reused from run to run.
    Never an operator's key: it lives under out/test/."""
    key = directory / "release-key.asc"
    if key.exists():
        return key
    directory.mkdir(parents=True, exist_ok=True)
    home = directory / "gnupg-tmp"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        sh(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "garage-node image test <release@test.invalid>",
            "ed25519", "sign", "never"], env=env)
        secret = sh(["gpg", "--batch", "--armor", "--export-secret-keys"], env=env).stdout
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
    tmp = key.with_suffix(".tmp")
    tmp.write_text(secret)
    tmp.rename(key)
    return key


def build_release(version: str, key: Path, directory: Path, garage_toml: str, *,
                  fail_gate: bool = False) -> tuple[Path, Path]:
    """build-image.sh --image-version VERSION --signing-key KEY into `directory` (reused when no
    input changed: only the version differs between the update tests' builds, so mkosi reuses one
    cached OS tree); returns the raw image and its release directory."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "garage.toml"
    if not conf.exists() or conf.read_text() != garage_toml:
        conf.write_text(garage_toml)
    img = directory / f"garage-node-{version}-base-amd64.img"
    cmd = [str(REPO / "build-image.sh"), "--config", str(conf), "--output", str(img), "--no-compress", "--if-changed",
           "--image-version", version, "--signing-key", str(key)]
    if fail_gate:
        cmd.append("--test-fail-health-gate")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    sys.stdout.write(proc.stdout[-2500:])
    assert proc.returncode == 0, f"build-image.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"version {version} build (or reuse): {time.monotonic() - t0:.1f} s")
    release = img.with_suffix(".release")
    assert (release / "SHA256SUMS.gpg").exists(), f"no signed release in {release}"
    return img, release


def partitions(disk: Path) -> list[dict]:
    """The GPT of a disk image: name (label), start and size in bytes."""
    table = json.loads(sh(["sfdisk", "-J", str(disk)]).stdout)["partitiontable"]
    size = table.get("sectorsize", 512)
    return [{"name": p.get("name", ""), "offset": p["start"] * size, "bytes": p["size"] * size, "type": p["type"]}
            for p in table["partitions"]]


def esp_kernels(disk: Path) -> list[str]:
    """The UKIs in the ESP's /EFI/Linux of a (powered off) disk image, read with mtools."""
    esp = next(p for p in partitions(disk) if p["name"] == "ESP")
    out = sh(["mdir", "-b", "-i", f"{disk}@@{esp['offset']}", "::/EFI/Linux"]).stdout
    return sorted(line.rsplit("/", 1)[-1] for line in out.splitlines() if line.strip().endswith(".efi"))


def parse_boot_log(log: str) -> dict:
    info: dict = {"status": []}
    for line in log.splitlines():
        # Only the marker's own console lines; the journal copy on the serial log
        # ("[  12.3] garage-boot-marker[1]: GARAGE-NODE-...") may be cut short.
        line = re.sub(r"\x1b\[[0-9;=?]*[A-Za-z]", "", line).strip("\r ")
        if "garage-boot-marker[" in line:
            continue
        m = re.search(r"GARAGE-NODE-(BOOTED|INFO|STATUS|END) ?(.*)$", line)
        if not m:
            continue
        kind, rest = m.groups()
        if kind == "BOOTED":
            info["hostname"] = rest.split()[0] if rest else ""
        elif kind == "INFO":
            for k, v in re.findall(r"(\S+?)=(\S*)", rest):
                info.setdefault(k, v)
            if rest.startswith("garage-node.service"):
                info["unit"] = dict(re.findall(r"(\w+)=(\S*)", rest))
            if rest.startswith("watchdog "):
                info["watchdog"] = dict(re.findall(r"(\w+)=(\S*)", rest))
        elif kind == "STATUS":
            info["status"].append(rest)
        elif kind == "END":
            info["end"] = True
    return info


def fat_offset(disk: Path) -> int:
    table = json.loads(sh(["sfdisk", "-J", str(disk)]).stdout)["partitiontable"]
    part = next(p for p in table["partitions"] if p.get("name") == "GARAGE")
    return part["start"] * table.get("sectorsize", 512)


def write_garage_toml(disk: Path, text: str, workdir: Path) -> None:
    src = workdir / "garage.toml"
    src.write_text(text)
    sh(["mcopy", "-o", "-i", f"{disk}@@{fat_offset(disk)}", str(src), "::garage.toml"])
    src.unlink()


class VM:
    def __init__(self, disk: Path, netns: str, workdir: Path) -> None:
        self.disk, self.netns, self.workdir = disk, netns, workdir
        self.runner: subprocess.Popen | None = None
        self.boots = 0

    def boot(self, *extra: str, timeout: int = JOIN_TIMEOUT + 300) -> Path:
        """Start QEMU on the disk; `extra`: more qemu-run.sh options (--reboot, --share DIR, ...)."""
        self.boots += 1
        log = self.workdir / f"serial-{self.boots}.log"
        self.pidfile = self.workdir / "qemu.pid"
        self.pidfile.unlink(missing_ok=True)
        self.runner = subprocess.Popen(
            [str(REPO / "image/qemu-run.sh"), str(self.disk), "--netns", self.netns, "--serial-log", str(log),
             "--pidfile", str(self.pidfile), "--mem", "4096", "--timeout", str(timeout), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        return log

    def pull_plug(self) -> None:
        """SIGKILL QEMU: the power is cut in the middle of whatever the guest is writing."""
        try:
            qpid = int(self.pidfile.read_text().strip())
            if Path(f"/proc/{qpid}/comm").read_text().startswith("qemu-system"):
                os.kill(qpid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        self.power_off()

    def power_off(self) -> None:
        """Pull the plug: QEMU quits at once, as a PC whose owner switches it off."""
        if self.runner is None:
            return
        try:
            qpid = int(self.pidfile.read_text().strip())
            if Path(f"/proc/{qpid}/comm").read_text().startswith("qemu-system"):
                os.kill(qpid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        try:
            self.runner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.runner.pid, signal.SIGKILL)
            self.runner.wait(timeout=10)
        self.runner = None


def wait_joined(head, timeout: float) -> dict:
    """The VM enrolled, its heartbeats arrive over HTTPS, and the head's Ray lists its Ray
    worker alive (the head probes Ray's GCS for the node's own labels)."""
    found: dict = {}

    def joined() -> bool:
        rows = [r for r in head.nodes() if r["name"] == "vm-pc"]
        if rows and rows[0]["status"] == "online" and rows[0]["ray_alive"]:
            found.update(rows[0])
            return True
        return False
    wait_for(joined, timeout, "the VM enrolled, heartbeating and its Ray worker alive at the head", interval=5)
    return found


def handshake_age(head) -> float:
    out = sh(["nsenter", "-t", str(head.proc.pid), "-m", "-n", "wg", "show", "gn-hub", "latest-handshakes"]).stdout
    stamps = [int(line.split()[1]) for line in out.splitlines() if line.strip()]
    return time.time() - max(stamps) if stamps and max(stamps) else float("inf")
