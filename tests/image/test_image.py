"""Layer 4 (phase 1): build the USB image and boot it in QEMU.

Builds the base variant with a test garage.toml baked in (reusing out/test/ when the
inputs did not change: `build-image.sh --if-changed`), boots it under TCG with OVMF on
a disk 2 GiB larger than the image, and reads the serial log that
garage-boot-marker.service writes after multi-user:

    GARAGE-NODE-BOOTED <hostname> uptime=<s>
    GARAGE-NODE-INFO key=value ...
    GARAGE-NODE-STATUS <garage-node status line>
    GARAGE-NODE-END <hostname> uptime=<s>

Needs root (mkosi) and qemu-system-x86_64; skipped elsewhere. A cold build takes
~6-7 min on 2 cores, a warm one ~2-3 min, the boot ~2.5-3 min.
Env: GARAGE_IMAGE_BOOT_TIMEOUT (s, default 600), GARAGE_IMAGE_KEEP=1 keeps the serial
log path printed for inspection (it always stays under out/test/).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from garage_node.core.wire import NodeState
from testing.image import GARAGE_TOML, NODE_NAME, OUT, PSK, REPO, SSH_KEY, TOKEN, parse_boot_log
from screenshot import prove_screen

pytestmark = pytest.mark.image

if os.geteuid() != 0 or not shutil.which("qemu-system-x86_64"):
    pytest.skip("image tests need root and qemu-system-x86_64", allow_module_level=True)

# What the screen may show in large type (garage_node.node.screen): every node state.
SCREEN_STATES = {s.value.upper() for s in NodeState}
# Boot went wrong: no point waiting for the marker.
EMERGENCY = ("Reached target emergency.target", "Cannot open access to console", "Kernel panic")
BOOT_TIMEOUT = int(os.environ.get("GARAGE_IMAGE_BOOT_TIMEOUT", "600"))


@pytest.fixture(scope="module")
def booted(image: Path) -> dict:
    log = OUT / "serial.log"
    pidfile = OUT / "qemu.pid"
    qmp = OUT / "qmp.sock"  # QEMU's control socket: screendump and send-key for the screen's tests
    for f in (log, pidfile, qmp):
        f.unlink(missing_ok=True)
    # QEMU's user-mode network would forward the guest's traffic to wherever it asks: run it
    # in an empty network namespace of our own (loopback only), so nothing leaves this machine.
    netns = f"gnimg-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    t0 = time.monotonic()
    runner = subprocess.Popen(
        [str(REPO / "image" / "qemu-run.sh"), str(image), "--grow", "2G", "--serial-log", str(log),
         "--pidfile", str(pidfile), "--timeout", str(BOOT_TIMEOUT + 300), "--netns", netns, "--qmp", str(qmp)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    booted_at = None
    text = ""
    try:
        deadline = t0 + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if booted_at is None and "GARAGE-NODE-BOOTED" in text:
                booted_at = time.monotonic() - t0
            if "GARAGE-NODE-END" in text:
                break
            if any(s in text for s in EMERGENCY):
                time.sleep(5)  # let the journal on the serial log say why
                break
            if runner.poll() is not None:
                break
            time.sleep(2)
        text = log.read_text(errors="replace") if log.exists() else ""
        # The PC's screen, read from the VM's display while it still runs: this boot serves
        # the screen's tests too (one boot less in CI). Artifacts: out/test/screen*.png.
        screen = (prove_screen(qmp, OUT, SCREEN_STATES) if "GARAGE-NODE-END" in text
                  else {"error": "the boot did not finish: no screen to read"})
    finally:
        # QEMU by its pid, then the qemu-run.sh wrapper (and its `timeout`) by pid.
        try:
            qpid = int(pidfile.read_text().strip())
            if Path(f"/proc/{qpid}/comm").read_text().startswith("qemu-system"):
                os.kill(qpid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        try:
            runner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait(timeout=10)
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    info = parse_boot_log(text)
    info["log"] = text
    info["screen"] = screen
    info["booted_s"] = booted_at
    print(f"serial log: {log}")
    print(f"boot to marker: {booted_at if booted_at is None else round(booted_at, 1)} s (QEMU start -> GARAGE-NODE-BOOTED)")
    for line in text.splitlines():
        if "GARAGE-NODE-" in line and "garage-boot-marker[" not in line:
            print(line.strip())
    assert booted_at is not None, f"no GARAGE-NODE-BOOTED marker within {BOOT_TIMEOUT}s; serial tail:\n{text[-6000:]}"
    assert info.get("end"), f"marker unit did not finish; serial tail:\n{text[-3000:]}"
    return info


def test_boot_marker(booted):
    assert booted["hostname"]
    assert booted["booted_s"] < BOOT_TIMEOUT


def test_hostname_from_garage_toml(booted):
    assert booted["hostname"] == NODE_NAME


def test_agent_service_started_by_systemd(booted):
    unit = booted["unit"]
    assert unit.get("Type") == "notify"
    # Started by systemd at boot: it has a main-process start time. Running, or in its
    # restart loop if this build of the agent cannot start (RestartSec=5, no limit).
    assert int(unit.get("ExecMainStartTimestampMonotonic", "0")) > 0, unit
    assert unit.get("ActiveState") in {"active", "activating", "reloading"}, unit
    assert booted["is-enabled"] == "enabled"


def test_agent_pets_its_watchdog(booted):
    """WatchdogSec is armed, the agent has sent WATCHDOG=1, and systemd never had to kill it."""
    dog = booted["watchdog"]
    assert dog.get("WatchdogUSec") == "1min", dog
    assert int(dog.get("WatchdogTimestampMonotonic", "0")) > 0, dog
    assert "garage-node.service: Watchdog timeout" not in booted["log"]


def test_data_partition_grew(booted):
    # 512 MiB in the image, 2 GiB added to the disk: the partition and its ext4 grew.
    part, fs = int(booted["data_part_bytes"]), int(booted["data_fs_bytes"])
    print(f"GARAGE-DATA: partition {part / 2**30:.2f} GiB, filesystem {fs / 2**30:.2f} GiB")
    assert part > 2 * 2**30
    assert fs > 2 * 2**30
    assert booted["state_mount"].endswith("[/state]")


def test_garage_partition_mounted(booted):
    assert booted["garage_mount"] == "vfat"


def test_secrets_not_in_journal_or_console(booted):
    assert booted["token_in_journal"] == "0"
    assert booted["token_in_journal_allfields"] == "0"
    assert booted["psk_in_journal"] == "0"
    assert booted["psk_in_journal_allfields"] == "0"
    assert TOKEN not in booted["log"]
    assert PSK not in booted["log"]


def test_first_boot_identity(booted):
    assert booted["machine_id_set"] == "yes"


def test_ssh_and_wifi_follow_garage_toml(booted):
    assert booted["ssh"] == "active"  # authorized_keys set
    assert booted["wifi_conf"] == "yes"  # ssid set (no Wi-Fi device in QEMU)


def test_network_and_no_failed_units(booted):
    assert "10.0.2.15" in booted.get("ipv4", "")
    assert booted["failed_units"] == "none", booted["failed_units"]


# ------------------------------------------------------------------ the PC's screen (tty1)
# Read from QEMU's display (screendump) in the boot above: tests/image/screenshot.py.


def _status_state(booted) -> str:
    """The node state `garage-node status` printed in the marker's summary ("State:     x error:
    ..."; a few states it words for a person, "agent not running" is agent-down)."""
    from garage_node.node.status import STATE_WORDS

    line = next((s for s in booted["status"] if s.startswith("State:")), "")
    m = re.match(r"State:\s+\S+\s+([^:]+):", line)
    assert m, booted["status"]
    words = {w: state.value for state, w in STATE_WORDS.items()}
    return words.get(m.group(1), m.group(1))


def test_screen_shows_the_state_in_large_type(booted):
    """garage-screen.service owns tty1 (no login prompt there) and shows the node's state in
    block letters: read back cell by cell, it is the state `garage-node status` printed (this
    node's token is unusable: `error`). The screenshot is kept as out/test/screen.png."""
    screen = booted["screen"]
    print(f"screen: {screen.get('png')} {screen.get('size')} word={screen.get('word')!r} error={screen.get('error')}")
    assert screen.get("word"), screen.get("error")
    assert screen["word"] == _status_state(booted).upper()


def test_screen_text_reads_back(booted):
    """The ordinary lines, by OCR (tesseract): the node's name and the problem in the words of
    `garage-node status`."""
    screen = booted["screen"]
    assert screen.get("word"), screen.get("error")
    # OCR reads the console font's hyphen as a dash now and then: one kind of dash, once.
    text = re.sub(r"[-—–]+", "-", " ".join(screen["ocr"].split()).lower())
    print(f"OCR ({screen.get('ocr_reads')} reads): {text[:600]}")
    assert NODE_NAME in text
    assert "join token" in text
    assert "alt+f2" in text.replace(" ", "")


def test_screen_drain_key_says_when_it_is_safe_to_power_off(booted):
    """`d` on the PC's keyboard drains through the agent, and the screen turns to SAFE TO POWER
    OFF (a green banner) once the agent says the engine is drained; `r` resumes and it goes."""
    screen = booted["screen"]
    assert screen.get("word"), screen.get("error")
    assert screen["drained_banner"], f"no banner after d: {screen.get('error')}"
    assert "SAFE TO POWER OFF" in " ".join(screen["drained_ocr"].upper().split())
    assert screen["resumed"], f"the banner stayed after r: {screen.get('error')}"
    assert TOKEN not in screen["ocr"] and TOKEN not in screen["drained_ocr"]


def test_screen_leaves_a_login_console_on_tty2(booted):
    """Alt+F2 shows a login prompt (logind's autovt on tty2), Alt+F1 the screen again."""
    screen = booted["screen"]
    assert screen.get("word"), screen.get("error")
    assert screen["tty2_login"], f"no login prompt on tty2: {screen.get('error')}"
    assert screen["tty1_back"], f"Alt+F1 did not bring the screen back: {screen.get('error')}"


# ------------------------------------------------------------------ garage-boot-config
# The boot script alone, against a scratch root (no QEMU needed, but it lives here).

BOOT_CONFIG = REPO / "image" / "mkosi.extra" / "usr" / "lib" / "garage-node" / "garage-boot-config"


def _run_boot_config(tmp_path: Path, toml: str) -> subprocess.CompletedProcess:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    conf = tmp_path / "garage.toml"
    conf.write_bytes(toml.encode())
    env = dict(os.environ, GARAGE_TOML=str(conf), GARAGE_ROOT=str(root))
    return subprocess.run([sys.executable, str(BOOT_CONFIG)], env=env, capture_output=True, text=True, check=True)


def test_boot_config_writes_wifi_and_ssh_without_printing_secrets(tmp_path):
    # A BOM and CRLF line ends, as Notepad may save them.
    p = _run_boot_config(tmp_path, "\ufeff" + GARAGE_TOML.replace("\n", "\r\n"))
    root = tmp_path / "root"
    assert TOKEN not in p.stdout + p.stderr and PSK not in p.stdout + p.stderr
    assert (root / "etc" / "hostname").read_text() == f"{NODE_NAME}\n"
    wpa = root / "run" / "garage-boot" / "wpa_supplicant.conf"
    assert oct(wpa.stat().st_mode & 0o777) == "0o600"
    text = wpa.read_text()
    assert "country=DE" in text and f"ssid={b'garage-test-wifi'.hex()}" in text
    keys = root / "root" / ".ssh" / "authorized_keys"
    assert SSH_KEY in keys.read_text() and oct(keys.stat().st_mode & 0o777) == "0o600"


def test_boot_config_defaults_and_bad_toml(tmp_path):
    p = _run_boot_config(tmp_path, "[node]\nname = \"\"\n")
    root = tmp_path / "root"
    assert (root / "etc" / "hostname").read_text() == "garage-abcdef\n"
    assert not (root / "run" / "garage-boot" / "wpa_supplicant.conf").exists()
    assert not (root / "root" / ".ssh" / "authorized_keys").exists()
    p = _run_boot_config(tmp_path, f'[node]\njoin_token = "{TOKEN}\n')  # broken TOML
    assert "not valid TOML" in p.stdout and TOKEN not in p.stdout
    p = _run_boot_config(tmp_path, '[node]\nname = "My Gaming PC!"\n')
    assert (root / "etc" / "hostname").read_text() == "my-gaming-pc\n"
