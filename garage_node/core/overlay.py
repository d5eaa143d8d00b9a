"""Facts about the WireGuard overlay that the node's and the head's configs both check.

Standard library only: build-image.sh validates a stick's garage.toml through node/config.py
before any dependency is installed, and this module comes with it (core/wireguard.py needs
`cryptography`, so these facts cannot live there)."""

from __future__ import annotations

from typing import Callable

# "auto": kernel WireGuard when the module loads, else wireguard-go (core/wireguard.py).
WG_IMPLEMENTATIONS = ("auto", "kernel", "wireguard-go")


def ifname_ok(name: str) -> bool:
    # Linux limits interface names to 15 bytes; wireguard-go would take "--help" as a name.
    return 0 < len(name) <= 15 and not name.startswith("-") and "/" not in name and " " not in name


IFNAME: tuple[Callable[[str], bool], str] = (
    ifname_ok, "a Linux interface name (1-15 characters, no '/', ' ' or leading '-')")
