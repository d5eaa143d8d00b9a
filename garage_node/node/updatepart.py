"""The agent's update part (issue #19): once per pass, the head's target (the heartbeat answer's
`update_target`) against the owner's [update] policy, the boot and the serving state, through
node/update.py's pure decide(); its status is the `update` key of the status document and of
the heartbeat's report.

On an A/B stick (`installer()` says nothing is missing) an allowed update runs in one
background job: the download and every check (node/install.py) start as soon as the update is
allowed, while the engine drains (DRAIN, `wants_drain`); once the engine is idle (INSTALL) the
checked files go to systemd-sysupdate, the record says `installing` (synced), and the PC
reboots into the new version. After the reboot settle() turns the record into OK or
ROLLED_BACK, and the next heartbeat reports it.

A release the installer refuses (signature, sums, variant) is recorded as failed with the
reason and never tried again; a failure that may pass (the head unreachable, a broken download,
a failed write) is retried with a growing pause, and after `MAX_TRIES` of them that version is
given up too, so nothing loops. On the old stick (one root, systemd 252) an INSTALL decision
stays a WAIT with the reason (`installer_missing()`), never pretended.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from garage_node.core.wire import UpdateStatus
from garage_node.node import install
from garage_node.node import update as up

log = logging.getLogger(__name__)

RECORD = "update.json"
MAX_TRIES = 5  # failures that may pass, per version, before it is given up
RETRY_S = 300.0  # the first pause after such a failure; doubled each time, at most RETRY_MAX_S
RETRY_MAX_S = 3600.0


class _Job:
    """One version's download, check and (once allowed) install, in its own thread: a root
    image is gigabytes, and the agent's passes go on meanwhile."""

    def __init__(self, version: str, installer: install.Installer, installed: Callable[[str], None]) -> None:
        self.version, self.installer, self.installed = version, installer, installed
        self.go, self.stop = threading.Event(), threading.Event()
        self.percent = 0
        self.phase = "downloading"  # -> "checked" -> "installing" -> "rebooting"
        self.error: install.InstallError | None = None
        self.done = False
        self.thread = threading.Thread(target=self._run, name=f"os-update-{version}", daemon=True)

    def _progress(self, pct: int) -> None:
        self.percent = pct

    def _run(self) -> None:
        try:
            verified = self.installer.fetch(self.version, self._progress, self.stop)
            self.phase = "checked"
            while not self.go.wait(1.0):
                if self.stop.is_set():
                    return
            self.phase = "installing"
            self.installer.install(verified)
            self.phase = "rebooting"
            self.installed(self.version)
        except install.InstallError as e:
            self.error = e
        except Exception as e:  # an OSError on the data partition, or a bug: reported, retried later
            log.exception("the update to %s failed", self.version)
            self.error = install.InstallError(f"the update failed on this PC: {str(e)[:300]}", retry=True)
        finally:
            close = getattr(self.installer.source, "close", None)
            if callable(close):
                close()
            self.done = True

    def text(self) -> str:
        if self.phase == "downloading":
            return f"downloading {self.version}: {self.percent}%"
        if self.phase == "checked":
            return f"{self.version} downloaded and checked; installing once the engine has drained"
        if self.phase == "installing":
            return f"writing {self.version} into the other slot (systemd-sysupdate)"
        return f"{self.version} installed: rebooting into it"


@dataclass
class UpdatePart:
    state_dir: Path
    policy: up.Policy
    clock: Callable[[], float]
    read_boot: Callable[[], up.BootFacts] = up.boot_facts
    variant: str | None = None  # the stick's ("base", "nvidia"); from the image's os-release
    installer: Callable[[], str | None] = up.installer_missing  # why this PC cannot install (None: it can)
    make_installer: Callable[[], install.Installer] | None = None  # the agent's: the head's API with its credential
    reboot: Callable[[], None] = install.reboot
    other_version: Callable[[str | None], str | None] = up.other_slot_version
    boot_id: Callable[[], str | None] = up.current_boot_id
    _boot: up.BootFacts | None = field(default=None, init=False)
    _record: up.UpdateRecord = field(default_factory=up.UpdateRecord, init=False)
    _decision: up.Decision = field(default_factory=lambda: up.Decision(up.Action.NONE), init=False)
    _target: str | None = field(default=None, init=False)
    _job: _Job | None = field(default=None, init=False)
    _tries: dict[str, int] = field(default_factory=dict, init=False)
    _not_before: float = field(default=0.0, init=False)
    _other: str | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @property
    def _path(self) -> Path:
        return self.state_dir / RECORD

    def step(self, target: str | None, *, serving: bool, idle: bool) -> up.Decision:
        """One pass: the boot read (the counter changes once, when the boot is blessed), the
        last update settled against it, the decision for `target`, and the install job driven."""
        now = self.clock()
        boot = self._boot = self.read_boot()
        with self._lock:
            before = up.load_record(self._path)
            record = up.settle(before, boot, now, self.boot_id())
            if record != before:
                up.save_record(self._path, record)
        self._record, self._target = record, target
        self._other = self.other_version(boot.os_version)
        if target is not None and target in record.rejected and target != boot.os_version:
            why = record.last_why if record.last_version == target and record.last_why else "its files were refused"
            d = up.Decision(up.Action.WAIT, f"{target} is not installed: {why}; the operator must publish a new build")
        else:
            d = up.decide(target, boot, self.policy, now, serving=serving, idle=idle,
                          refused=frozenset(record.refused), approved=up.approved(self.state_dir))
        if d.action in (up.Action.DRAIN, up.Action.INSTALL):
            d = self._drive(target, d, now)
        else:
            self._halt()
        self._decision = d
        return d

    def _drive(self, target: str | None, d: up.Decision, now: float) -> up.Decision:
        assert target is not None
        missing = self.installer() or (None if self.make_installer else "the agent has no installer for this stick")
        if missing is not None:
            return up.Decision(up.Action.WAIT, f"{target} cannot be installed here: {missing}")
        job = self._job
        if job is not None and job.version != target and job.phase not in ("installing", "rebooting"):
            job.stop.set()  # the head names another version now
            self._job = job = None
        if job is not None and job.done and job.error is not None:
            self._job = None
            return self._failed(job.version, job.error, now)
        if job is None:
            if now < self._not_before:
                return up.Decision(up.Action.WAIT, f"{self._record.last_why or 'the last try failed'}; trying "
                                                   f"{target} again in {int(self._not_before - now)} s")
            assert self.make_installer is not None
            try:
                made = self.make_installer()
            except Exception as e:  # the head's CA unreadable, no identity: said, and tried next pass
                return up.Decision(up.Action.WAIT, f"{target} cannot be fetched now: {str(e)[:200]}")
            job = self._job = _Job(target, made, self._installed)
            job.thread.start()
        if d.action == up.Action.INSTALL and job.phase == "checked":
            job.go.set()
        return d

    def _failed(self, version: str, e: install.InstallError, now: float) -> up.Decision:
        tries = self._tries[version] = self._tries.get(version, 0) + 1
        final = not e.retry or tries >= MAX_TRIES
        why = str(e) if not e.retry or not final else f"{e} (given up after {tries} tries)"
        log.warning("the update to %s failed: %s", version, why)
        with self._lock:
            self._record = up.load_record(self._path).failed(version, why, now, final=final)
            up.save_record(self._path, self._record)
        if not final:
            self._not_before = now + min(RETRY_MAX_S, RETRY_S * 2 ** (tries - 1))
            return up.Decision(up.Action.WAIT, f"{why}; trying again in {int(self._not_before - now)} s")
        return up.Decision(up.Action.WAIT, f"{version} is not installed: {why}")

    def _installed(self, version: str) -> None:
        """In the job's thread, once sysupdate wrote the other slot: the record first (synced),
        so the next boot knows what it is trying, then the reboot."""
        with self._lock:
            before = up.load_record(self._path)
            up.save_record(self._path, before.started(version, self.clock(), self.boot_id()))
        log.info("rebooting into %s", version)
        try:
            self.reboot()
        except install.InstallError:
            with self._lock:  # still on this boot: not an update that rolled back
                up.save_record(self._path, before)
            raise

    def _halt(self) -> None:
        """Not allowed now (or nothing to do): a download under way stops (it resumes later);
        an install under way finishes."""
        job = self._job
        if job is not None and job.phase not in ("installing", "rebooting"):
            job.stop.set()
            self._job = None

    @property
    def wants_drain(self) -> bool:
        """The engine stays drained from the moment the update is allowed until the reboot."""
        return self._decision.action in (up.Action.DRAIN, up.Action.INSTALL)

    @property
    def job(self) -> _Job | None:
        return self._job

    def status(self) -> UpdateStatus | None:
        """None until the first pass, and on a PC whose OS has no version (not the stick)."""
        if self._boot is None or self._boot.os_version is None:
            return None
        d = self._decision
        job = self._job
        if job is not None and not job.done and d.action in (up.Action.DRAIN, up.Action.INSTALL):
            d = up.Decision(up.Action.WAIT, job.text() + (f"; {d.why}" if d.action == up.Action.DRAIN else ""))
        return up.status(self._boot, self._record, self.policy, self._target, d, self.variant, self._other)
