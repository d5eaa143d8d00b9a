"""The PC's update policy (node/update.py, [update] of node/config.py): may it update now (only
on a blessed boot, in the owner's window or when idle, approved where the owner asks, after
draining), the boot counter read from efivarfs and the ESP as systemd-boot leaves them, and the
outcome written before the reboot and settled after it."""

from __future__ import annotations

from dataclasses import replace

import os
import threading
from datetime import datetime
from zoneinfo import ZoneInfo

import httpx
import pytest

from garage_node.core.settings import ConfigError
from garage_node.core.wire import UpdateOutcome
from garage_node.node import update as up
from garage_node.node.config import load_node_config
from garage_node.node.install import Installer
from garage_node.node.update import Action, BootFacts, Policy, UpdateRecord, decide

BERLIN = ZoneInfo("Europe/Berlin")
GOOD = BootFacts(os_version="v1", blessed=True, tries_left=None, ab=True)


def at(text: str) -> float:
    """Epoch seconds of a local Berlin time, e.g. "2026-12-07 04:00" (a Monday)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=BERLIN).timestamp()


def decision(target: str | None = "v2", boot: BootFacts = GOOD, policy: Policy | None = None,
             when: str = "2026-12-07 04:00", **kw) -> up.Decision:
    kw.setdefault("serving", False)
    kw.setdefault("idle", True)
    return decide(target, boot, policy or Policy("window", ("daily 03:00-06:00",), BERLIN), at(when), **kw)


def test_nothing_to_do_without_a_target_or_on_it():
    assert decision(None).action == Action.NONE
    assert decision("v1").action == Action.NONE


def test_in_the_window_on_a_blessed_boot_it_installs_after_draining():
    assert decision().action == Action.INSTALL
    d = decision(idle=False)
    assert d == up.Decision(Action.DRAIN, "draining before the update to v2")


def test_outside_the_window_it_waits_and_says_until_when():
    d = decision(when="2026-12-07 14:00")
    assert d.action == Action.WAIT
    assert d.why == "outside the update window daily 03:00-06:00 (next from Tue 03:00 CET)"
    # Over midnight and by the zone's wall clock: 23:30-01:00 is open at 00:30.
    assert decision(policy=Policy("window", ("daily 23:30-01:00",), BERLIN), when="2026-12-08 00:30").action == \
        Action.INSTALL


def test_never_on_a_boot_that_is_not_blessed():
    d = decision(boot=BootFacts("v1", False, 2, True))
    assert d.action == Action.WAIT and "not confirmed good yet (2 tries left)" in d.why
    assert decision(boot=BootFacts("v1", None, None, True)).action == Action.WAIT  # not known: not allowed


def test_the_owners_never_ask_and_idle():
    assert decision(policy=Policy("never")).why == 'the owner allows no updates ([update] when = "never")'
    d = decision(policy=Policy("ask"))
    assert d.action == Action.WAIT and "garage-node update approve v2" in d.why
    assert decision(policy=Policy("ask"), approved="v1").action == Action.WAIT
    assert decision(policy=Policy("ask"), approved="v2").action == Action.INSTALL
    d = decision(policy=Policy("idle"), serving=True, idle=False)
    assert d.action == Action.WAIT and "only when it is not serving" in d.why
    assert decision(policy=Policy("idle"), serving=False, idle=False).action == Action.DRAIN
    assert decision(policy=Policy("idle"), when="2026-12-07 14:00").action == Action.INSTALL  # no window for idle


def test_a_version_that_rolled_back_is_not_tried_again_and_a_stick_without_ab_says_so():
    d = decision(refused=frozenset({"v2"}))
    assert d.action == Action.WAIT and "not tried again" in d.why
    d = decision(boot=BootFacts("v1", True, None, ab=False))
    assert d.action == Action.WAIT and "flash an A/B stick" in d.why


def test_the_boot_counter(tmp_path):
    assert up.parse_counter("\\EFI\\Linux\\garage_2026.12.1+2-1.efi") == (2, 1)
    assert up.parse_counter("/loader/entries/garage+3.conf") == (3, 0)
    assert up.parse_counter("\\EFI\\Linux\\garage_2026.12.1.efi") is None
    osr = tmp_path / "os-release"
    osr.write_text('ID=debian\nIMAGE_ID=garage-node\nIMAGE_VERSION="2026.12.1"\n')
    efivars, esp, sud = tmp_path / "efivars", tmp_path / "esp", tmp_path / "sysupdate.d"
    sysupdate = tmp_path / "systemd-sysupdate"
    kw = dict(os_release=osr, efivars=efivars, esp=esp, sysupdate_d=sud, sysupdate=(str(sysupdate),))
    # No EFI: nothing known about blessing; not an A/B stick.
    assert up.boot_facts(**kw) == BootFacts("2026.12.1", None, None, False)  # type: ignore[arg-type]
    efivars.mkdir()
    # Booted an uncounted entry (or one already blessed before this boot).
    assert up.boot_facts(**kw).blessed is True  # type: ignore[arg-type]
    entry = "\\EFI\\Linux\\garage_2026.12.1+1-2.efi"
    (efivars / up.BOOT_COUNT_VAR).write_bytes(b"\x06\x00\x00\x00" + (entry + "\0").encode("utf-16-le"))
    counted = esp / "EFI" / "Linux" / "garage_2026.12.1+1-2.efi"
    counted.parent.mkdir(parents=True)
    counted.write_bytes(b"MZ")
    assert up.boot_facts(**kw) == BootFacts("2026.12.1", False, 1, False)  # type: ignore[arg-type]
    # systemd-bless-boot renames it without the counter: blessed.
    counted.rename(counted.with_name("garage_2026.12.1.efi"))
    assert up.boot_facts(**kw).blessed is True  # type: ignore[arg-type]
    # An A/B stick: systemd-sysupdate and its transfers.
    sysupdate.write_text("#!/bin/sh\n")
    os.chmod(sysupdate, 0o755)
    sud.mkdir()
    assert up.boot_facts(**kw).ab is False  # type: ignore[arg-type]
    (sud / "50-root.conf").write_text("[Transfer]\n")
    assert up.boot_facts(**kw).ab is True  # type: ignore[arg-type]
    assert "systemd 252" in (up.installer_missing((str(tmp_path / "none"),)) or "")


def test_the_outcome_across_the_reboot(tmp_path):
    rec = UpdateRecord().started("v2", 100.0)
    path = tmp_path / "update.json"
    up.save_record(path, rec)
    rec = up.load_record(path)
    assert rec.last_outcome == UpdateOutcome.INSTALLING and rec.last_version == "v2"
    # Booted v2, health gate not passed yet: still installing.
    assert up.settle(rec, BootFacts("v2", False, 2, True), 200.0) == rec
    ok = up.settle(rec, BootFacts("v2", True, None, True), 200.0)
    assert ok.last_outcome == UpdateOutcome.OK and ok.refused == ()
    # Back on v1: its tries ran out. Refused for good, and said so.
    back = up.settle(rec, BootFacts("v1", True, None, True), 300.0)
    assert back.last_outcome == UpdateOutcome.ROLLED_BACK and back.refused == ("v2",)
    assert back.last_why == "v2 did not pass its health check within its tries: back on v1"
    up.save_record(path, back)
    assert up.load_record(path) == back
    assert decision(refused=frozenset(up.load_record(path).refused)).action == Action.WAIT
    # The owner installs v2 again by hand: tried afresh, the other refusals kept.
    again = replace(back, refused=("v0", "v2")).started("v2", 400.0)
    assert again.refused == ("v0",) and again.last_outcome == UpdateOutcome.INSTALLING
    # A damaged file is a fresh record, not a crash.
    path.write_text("{not json")
    assert up.load_record(path) == UpdateRecord()
    s = up.status(GOOD, back, Policy("window"), "v2", decision(refused=frozenset({"v2"})), "base", "v2")
    assert s.last_outcome == UpdateOutcome.ROLLED_BACK and s.pending_why and "not tried again" in s.pending_why


def test_the_update_section_of_garage_toml(tmp_path):
    base = tmp_path / "node.toml"
    base.write_text("")
    over = tmp_path / "garage.toml"
    assert load_node_config(base, tmp_path / "none.toml").update.when == "window"
    over.write_text('[update]\nwhen = "idle"\n')
    assert load_node_config(base, over).update.when == "idle"
    over.write_text('[update]\nwhen = "sometimes"\n')
    with pytest.raises(ConfigError, match="'update.when' must be one of window, idle, ask, never"):
        load_node_config(base, over)
    over.write_text('[update]\nwindows = ["nightly"]\n')
    with pytest.raises(ConfigError, match="'update.windows' must be a list of"):
        load_node_config(base, over)
    over.write_text('[update]\nwindows = []\n')
    with pytest.raises(ConfigError, match=r"\[update\] windows is empty while when = \"window\""):
        load_node_config(base, over)
    over.write_text('[update]\nwhen = "window"\nwindows = ["sat-sun 02:00-05:00"]\ntimezone = "Europe/Berlin"\n')
    p = up.policy_of(load_node_config(base, over).update)
    assert p.windows == ("sat-sun 02:00-05:00",) and str(p.tz) == "Europe/Berlin"


def test_update_approve(tmp_path, capsys):
    from garage_node.cli import main

    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n[update]\nwhen = "ask"\n')
    args = ["--config", str(conf), "--override", str(tmp_path / "none.toml")]
    assert up.approved(tmp_path / "state") is None
    assert main(["update", "approve", "2026.12.1", *args]) == 0
    assert capsys.readouterr().out.startswith("approved 2026.12.1: this PC installs it")
    assert up.approved(tmp_path / "state") == "2026.12.1"
    assert decision(policy=Policy("ask"), approved=up.approved(tmp_path / "state"), target="2026.12.1").action == \
        Action.INSTALL
    assert main(["update", "approve", "1_2", *args]) == 2
    assert "not a release version" in capsys.readouterr().err


def test_the_agents_update_part(tmp_path):
    from garage_node.node.updatepart import UpdatePart

    now = [at("2026-12-07 04:00")]
    boot = [BootFacts("v1", False, 2, True)]
    part = UpdatePart(tmp_path, Policy("window", ("daily 03:00-06:00",), BERLIN), lambda: now[0],
                      read_boot=lambda: boot[0], variant="base")
    assert part.status() is None  # before the first pass
    # Not blessed yet: it waits, and says so in its status.
    assert part.step("v2", serving=True, idle=False).action == Action.WAIT
    s = part.status()
    assert s is not None and s.target == "v2" and s.tries_left == 2 and "not confirmed good" in (s.pending_why or "")
    # Blessed, in the window: it would drain, then install, but this stick has no installer;
    # the reason is what it reports, and it never drains for it.
    boot[0] = GOOD
    for serving, idle in ((True, False), (False, True)):
        d = part.step("v2", serving=serving, idle=idle)
        assert d.action == Action.WAIT and "v2 cannot be installed here: " in d.why and not part.wants_drain
    # An update that was underway before a reboot, and came back on the old version.
    up.save_record(tmp_path / "update.json", UpdateRecord().started("v2", now[0]))
    assert part.step("v2", serving=False, idle=True).why.endswith("not tried again")
    s = part.status()
    assert s is not None and s.last_outcome == UpdateOutcome.ROLLED_BACK and s.last_version == "v2"
    assert up.load_record(tmp_path / "update.json").refused == ("v2",)
    # A PC not booted from a versioned image reports nothing.
    boot[0] = BootFacts(None, None, None, False)
    part.step(None, serving=True, idle=False)
    assert part.status() is None


def test_the_head_session_keeps_the_update_target_of_the_last_answer(tmp_path):
    from testing.agentrig import rig

    r = rig(tmp_path)
    r.passes(4)
    assert r.agent.session.update_target is None
    r.head.update_target = "2026.12.2"
    r.passes(8, every_s=2.0)  # past the next heartbeat
    assert r.agent.session.update_target == "2026.12.2"
    r.head.update_target = None  # the rollout was aborted
    r.passes(8, every_s=2.0)
    assert r.agent.session.update_target is None


def test_the_agent_reports_the_heads_target_and_never_drains_for_an_update_it_cannot_install(tmp_path):
    """The agent wired to its update part: the head's target and why it is not installed reach
    `status` and the heartbeat's report; in the owner's window, with the engine serving, the
    part would drain first, but on a stick that cannot install the engine is left serving."""
    from garage_node.core.wire import NodeReport
    from garage_node.node.updatepart import UpdatePart
    from testing.agentrig import rig

    r = rig(tmp_path)
    r.agent.updates = UpdatePart(tmp_path / "state", Policy("window", ("daily 03:00-06:00",), BERLIN),
                                 lambda: at("2026-12-07 04:00"), read_boot=lambda: GOOD, variant="base")
    r.joined()
    r.head.update_target = "v2"
    r.passes(8, every_s=2.0)  # past the next heartbeat
    s = r.status()
    assert s.update is not None and s.update.os_version == "v1" and s.update.target == "v2"
    assert "cannot be installed here" in (s.update.pending_why or "")
    assert NodeReport.of(r.agent.snapshot()).update == s.update  # the head hears it too
    # Serving in the window: on this stick the part does not even ask for a drain.
    assert r.agent.updates.step("v2", serving=True, idle=False).action == Action.WAIT
    assert r.agent._update_drains() is None
    # An A/B stick (its installer found): the download starts and the engine drains meanwhile.
    # The head's files never arrive here (node/install.py's own tests fetch them for real).
    hold = threading.Event()

    class Silent:
        def get(self, path, headers):
            hold.wait(30)
            raise httpx.ConnectError("the test is over")

    r.agent.updates.installer = lambda: None
    r.agent.updates.make_installer = lambda: Installer(Silent(), "base")  # type: ignore[arg-type]
    try:
        assert r.agent.updates.step("v2", serving=True, idle=False).action == Action.DRAIN
        assert r.agent._update_drains() == "draining for the OS update to v2"
        st = r.agent.updates.status()
        assert st is not None and (st.pending_why or "").startswith("downloading v2: 0%; draining")
    finally:
        hold.set()


def test_a_pc_that_has_not_joined_shows_its_os_and_its_last_update(tmp_path):
    """No head (a token not yet given, or a broken one): nothing to install, but `status` shows
    the stick's version and a rollback of an update installed by hand."""
    from garage_node.node.updatepart import UpdatePart
    from testing.agentrig import rig

    r = rig(tmp_path, token="not-a-token")  # as the QEMU test's stick: its token does not decode
    up.save_record(tmp_path / "state" / "update.json", UpdateRecord().started("v2", 100.0, boot_id="before"))
    r.agent.updates = UpdatePart(tmp_path / "state", Policy("idle"), lambda: 200.0, read_boot=lambda: GOOD,
                                 variant="base")
    r.passes(2, every_s=2.0)
    s = r.status()
    assert r.agent.identity is None and s.update is not None and s.update.os_version == "v1"
    assert s.update.last_outcome == UpdateOutcome.ROLLED_BACK and s.update.target is None


def test_status_shows_the_os_version_and_why_the_heads_target_waits():
    from garage_node.core.wire import UpdateStatus
    from garage_node.node.status import update_lines

    class S:
        update = None

    assert update_lines(S()) == []  # not a versioned stick
    S.update = UpdateStatus(os_version="v1", variant="base", blessed=True, policy="window", target="v2",
                            pending_why="outside the update window until 03:00", last_version="v0",
                            last_outcome=UpdateOutcome.ROLLED_BACK, last_why="its tries ran out")
    lines = update_lines(S())
    assert lines[0] == "v1 (base); updates: window"
    assert lines[1] == "the head wants v2: outside the update window until 03:00"
    assert lines[2] == "last update to v0: rolled-back (its tries ran out)"


def test_the_sticks_version_and_variant_come_from_os_release(tmp_path):
    """A rollout takes only PCs whose variant matches the release's: the agent reads it from
    os-release (VARIANT_ID) beside the version (IMAGE_VERSION); a machine without them has none."""
    path = tmp_path / "os-release"
    path.write_text('NAME="Debian GNU/Linux"\nIMAGE_VERSION=2026.12.1\nVARIANT_ID="nvidia"\n')
    assert up.os_release_value("IMAGE_VERSION", path) == "2026.12.1"
    assert up.os_release_value("VARIANT_ID", path) == "nvidia"
    assert up.os_release_value("VARIANT_ID", tmp_path / "missing") is None
    path.write_text('NAME="Debian GNU/Linux"\n')
    assert up.os_release_value("VARIANT_ID", path) is None


def test_the_other_slots_version_comes_from_the_partition_labels(tmp_path):
    """As the kernel shows GPT labels in sysfs (PARTNAME in each partition's uevent), with a
    second stick in the PC whose labels must not count."""
    devices, block = tmp_path / "devices", tmp_path / "class-block"
    block.mkdir()
    for disk, n, label in (("sda", 1, "garage-root_2026.11.1"), ("sdb", 3, "garage-root_2026.12.1"),
                           ("sdb", 4, "garage-root_2026.11.2"), ("sdb", 5, "GARAGE-DATA"), ("sdc", 3, "_empty"),
                           ("sdc", 2, "garage-root_2026.12.9")):
        part = devices / disk / f"{disk}{n}"
        part.mkdir(parents=True)
        (part / "uevent").write_text(f"MAJOR=8\nMINOR={n}\nDEVNAME={disk}{n}\nDEVTYPE=partition\nPARTN={n}\n"
                                     f"PARTNAME={label}\n")
        (block / f"{disk}{n}").symlink_to(part)
    assert up.other_slot_version("2026.12.1", block) == "2026.11.2"
    assert up.other_slot_version("2026.12.9", block) is None  # its other slot is "_empty"
    assert up.other_slot_version(None, block) is None and up.other_slot_version("x", tmp_path / "none") is None


def test_what_an_ab_stick_needs_to_install(tmp_path):
    sysupdate = tmp_path / "systemd-sysupdate"
    sysupdate.write_text("#!/bin/sh\n")
    os.chmod(sysupdate, 0o755)
    defs, keys = tmp_path / "sysupdate.d", tmp_path / "release-keys.gpg"
    kw = dict(sysupdate=(str(sysupdate),), sysupdate_d=(defs,), keys=keys)
    assert "one root and no sysupdate.d" in (up.installer_missing(**kw) or "")  # type: ignore[arg-type]
    defs.mkdir()
    (defs / "50-garage-root.conf").write_text("[Transfer]\n")
    assert "carries no release key" in (up.installer_missing(**kw) or "")  # type: ignore[arg-type]
    keys.write_bytes(b"keyring")
    assert up.installer_missing(**kw) is None  # type: ignore[arg-type]


def test_an_agent_restarted_before_the_reboot_does_not_call_it_a_rollback():
    rec = UpdateRecord().started("v2", 100.0, boot_id="boot-a")
    old = BootFacts("v1", True, None, True)
    assert up.settle(rec, old, 200.0, boot_id="boot-a") == rec  # the same boot: the reboot has not happened
    after = up.settle(rec, old, 200.0, boot_id="boot-b")  # rebooted, and back on v1
    assert after.last_outcome == UpdateOutcome.ROLLED_BACK and after.refused == ("v2",)
    assert up.current_boot_id() not in (None, "")  # this kernel's


def test_an_installer_that_cannot_be_made_now_is_a_wait_not_a_failed_pass(tmp_path):
    from garage_node.node.updatepart import UpdatePart

    def make() -> Installer:
        raise FileNotFoundError(2, "No such file or directory", "/var/lib/garage-node/head-ca.pem")

    part = UpdatePart(tmp_path, Policy("idle"), lambda: 0.0, read_boot=lambda: GOOD, variant="base",
                      installer=lambda: None, make_installer=make, other_version=lambda v: None)
    d = part.step("v2", serving=False, idle=True)
    assert d.action == Action.WAIT and d.why.startswith("v2 cannot be fetched now: ") and "head-ca.pem" in d.why
    assert not part.wants_drain and part.job is None
