"""WireGuard keys the node makes *before* it asks the head to accept them.

Enrollment and key rotation both tell the head a new public key. If the node made the key and
then crashed before storing the head's answer, the head would know a key the node no longer
has. So the key is made and stored first (0600, atomic: write, fsync, rename), the head is
asked, and only once the identity holding the key is stored is the pending file removed. A node
that crashed in between finds the same key and asks again with it; the head recognises the
same request (same token and key, or the key it already holds) and answers the same way.
"""

from __future__ import annotations

from pathlib import Path

from garage_node.core.fsutil import read_json, write_json
from garage_node.core.wireguard import generate_private_key


def pending_key(path: Path, purpose: str, avoid: str = "") -> str:
    """The private key stored at `path` for `purpose` (a join token's digest, a node id), or a
    new one stored there first. `avoid`: a key that must not be reused (the identity's current
    one, e.g. after a revocation)."""
    try:
        kept = read_json(path)
        key = kept["wg_private_key"] if kept.get("purpose") == purpose else ""
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        key = ""  # absent or damaged: make a new one
    if isinstance(key, str) and key and key != avoid:
        return key
    key = generate_private_key()
    write_json(path, {"purpose": purpose, "wg_private_key": key})
    return key


def done(path: Path) -> None:
    """The key is in the stored identity now; the pending copy goes."""
    path.unlink(missing_ok=True)
