"""Tell systemd how we are doing (sd_notify): READY, STATUS, WATCHDOG, STOPPING.

Uses libsystemd through systemd-python when it is installed; otherwise speaks the notify
socket protocol directly (one datagram to $NOTIFY_SOCKET), which is all sd_notify does.
Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

try:
    from systemd import daemon as _daemon
except ImportError:  # pragma: no cover - depends on the host
    _daemon = None


def notify(state: str) -> bool:
    if _daemon is not None:
        return bool(_daemon.notify(state))
    return _notify_socket(state)


def _notify_socket(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), addr)
    return True


def ready(status: str) -> None:
    notify(f"READY=1\nSTATUS={status}")


def status(text: str) -> None:
    notify(f"STATUS={text}")


def watchdog() -> None:
    notify("WATCHDOG=1")


def stopping() -> None:
    notify("STOPPING=1")
