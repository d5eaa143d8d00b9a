"""A supervised child process (the Ray worker, the Ray head): started, watched, restarted
with backoff when it dies, and stopped gently with its whole process group."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from garage_node.core.backoff import Backoff
from garage_node.core.clock import SYSTEM, Clock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunAs:
    """An unprivileged account to run a child as (the Ray worker on a PC never runs as root)."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, user: str, extra_groups: tuple[str, ...] = ()) -> RunAs:
        """Raises KeyError if the user does not exist; groups that do not exist are skipped."""
        import grp
        import pwd

        pw = pwd.getpwnam(user)
        groups = []
        for name in extra_groups:
            try:
                groups.append(grp.getgrnam(name).gr_gid)
            except KeyError:
                pass
        return cls(user, pw.pw_uid, pw.pw_gid, tuple(groups), pw.pw_dir)


@dataclass
class ChildState:
    running: bool = False
    pid: int | None = None
    started_at: float | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    next_start_at: float = 0.0
    last_lines: list[str] = field(default_factory=list)


class Supervised:
    def __init__(self, name: str, log_path: Path, backoff: Backoff, env: dict[str, str] | None = None,
                 pid_file: Path | None = None, clock: Clock = SYSTEM, run_as: RunAs | None = None) -> None:
        self.name = name
        self.clock = clock
        self.log_path = log_path
        # Where the child's PID is kept, so that after our own crash the next start can end
        # the orphaned child (and its process group) before starting a new one.
        self.pid_file = pid_file
        self._orphans_checked = False
        self.backoff = backoff
        self.env = env
        self.run_as = run_as
        self.state = ChildState()
        self._proc: subprocess.Popen | None = None
        self._healthy_after_s = 30.0  # running this long resets the backoff

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poll(self) -> None:
        """Notice an exit and schedule the restart."""
        if self._proc is None or self._proc.poll() is None:
            if self.running and self.state.started_at and self.clock.monotonic() - self.state.started_at > self._healthy_after_s:
                self.backoff.reset()
            return
        code = self._proc.returncode
        # What it spawned may outlive it (a failed `ray start` leaves Ray's agents importing
        # for a minute): end the rest of its group, or every retry adds to the pile.
        _signal_group(self._proc.pid, signal.SIGKILL)
        self._proc = None
        delay = self.backoff.next_delay()
        self.state = ChildState(
            running=False,
            restarts=self.state.restarts + 1,
            last_exit_code=code,
            next_start_at=self.clock.monotonic() + delay,
            last_lines=self.tail(),
        )
        last = " | ".join(line.strip() for line in self.state.last_lines[-3:] if line.strip())
        # Its last words go to the journal: the reason a child dies is usually in them.
        log.warning("%s exited with code %s; restarting in %.1f s. Last output: %s", self.name, code, delay, last[-600:] or "none")

    def ensure(self, argv: list[str]) -> bool:
        """Start the child if it is not running and its backoff has passed; True if it runs."""
        self.poll()
        if self.running:
            return True
        if self.clock.monotonic() < self.state.next_start_at:
            return False
        if not self._orphans_checked:
            self._end_orphan()
            self._orphans_checked = True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_path.open("ab")
        try:
            # Own session: stop() can end the child and everything it spawned by its PID.
            self._proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=self._env(), **self._identity(),
            )
        finally:
            out.close()
        self.state.running, self.state.pid = True, self._proc.pid
        self.state.started_at = self.clock.monotonic()
        if self.pid_file:
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(f"{self._proc.pid}\n")
        log.info("started %s (pid %d)", self.name, self._proc.pid)
        return True

    def retry_now(self) -> None:
        """What made the child fail is gone (the network is back): the next ensure() starts it
        at once, and the backoff starts over, instead of waiting out a delay that grew while
        the cause lasted."""
        self.backoff.reset()
        self.state.next_start_at = 0.0

    def _env(self) -> dict[str, str] | None:
        if self.run_as is None:
            return self.env
        env = dict(self.env if self.env is not None else os.environ)
        env.update(HOME=self.run_as.home, USER=self.run_as.user, LOGNAME=self.run_as.user)
        return env

    def _identity(self) -> dict:
        """Popen arguments that drop to the unprivileged account (only root can switch)."""
        r = self.run_as
        if r is None or os.geteuid() != 0:
            return {}
        return {"user": r.uid, "group": r.gid, "extra_groups": list(r.groups)}

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
        # Children of the group (e.g. raylet) may outlive the leader: end them too.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        self.state.running, self.state.pid = False, None
        if self.pid_file:
            self.pid_file.unlink(missing_ok=True)

    def _end_orphan(self) -> None:
        """A child left running by a previous agent that died (SIGKILL, crash): end its group."""
        if self.pid_file is None or not self.pid_file.exists():
            return
        try:
            pid = int(self.pid_file.read_text())
            # Only a group we made: the child leads its own session, so its pgid is its pid.
            if os.getpgid(pid) == pid:
                log.warning("ending %s left over from a previous run (pid %d)", self.name, pid)
                _signal_group(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.1)
                _signal_group(pid, signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        self.pid_file.unlink(missing_ok=True)

    def tail(self, n: int = 12) -> list[str]:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return list(deque(lines, maxlen=n))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
