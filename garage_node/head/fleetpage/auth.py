"""The fleet page's admin key: made by `garage-node head fleet-key`, shown once, stored only as
a SHA-256 hash in the head's state directory (0600). A browser trades the key for a session
cookie (random, held in this process's memory only, HttpOnly, SameSite=Strict), so the key is
typed once and never stored by the page.

The key file is read at every login, so a new key works at once without restarting the head,
and sessions opened with the old one end at their next request (each session remembers the
hash it was opened under).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from garage_node.core.fsutil import write_private

KEY_FILE = "fleet-key.sha256"
KEY_PREFIX = "gfk1."
SESSION_COOKIE = "garage_fleet"
SESSION_LIFETIME_S = 12 * 3600.0
MAX_SESSIONS = 1000


def key_file(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()


def make_key(state_dir: Path) -> str:
    """A new admin key (256 random bits); only its hash is written. Replaces any earlier key."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    write_private(key_file(state_dir), (_digest(key) + "\n").encode())
    return key


def stored_hash(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text if len(text) == 64 else None


class Sessions:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._sessions: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (expires, key hash)
        self._lock = threading.Lock()

    def key_exists(self) -> bool:
        return stored_hash(self.path) is not None

    def login(self, key: str) -> str | None:
        """A new session id if `key` is the admin key, else None."""
        wanted = stored_hash(self.path)
        if wanted is None or not hmac.compare_digest(_digest(key), wanted):
            return None
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = (self.clock() + SESSION_LIFETIME_S, wanted)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid

    def valid(self, sid: str | None) -> bool:
        if not sid:
            return False
        with self._lock:
            entry = self._sessions.get(sid)
        if entry is None:
            return False
        expires, opened_under = entry
        if expires < self.clock() or stored_hash(self.path) != opened_under:
            self.logout(sid)
            return False
        return True

    def logout(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)
