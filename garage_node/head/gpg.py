"""OpenPGP through the real `gpg` (gnupg, installed by scripts/install-deps): the operator's
public signing keys kept as one binary keyring, and detached signatures checked against it.

A binary keyring (what `gpg --export` writes) because it is exactly what systemd-sysupdate's
`systemd-pull` reads on the stick (/etc/systemd/import-pubring.gpg): the head and the PCs trust
the same file. Every call runs gpg in a throwaway home directory (no agent, no trust database,
nothing written outside it), reads its machine-readable output (--with-colons, --status-fd) and
never its messages for people, which change between versions and languages.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from garage_node.core import gpgstatus
from garage_node.core.fsutil import write_private

GPG = "gpg"
TIMEOUT_S = 60.0  # a signature over a few lines of SHA256SUMS takes milliseconds


class GpgError(Exception):
    """A key or a signature was refused; the message says why and what to do."""


@dataclass(frozen=True)
class PublicKey:
    fingerprint: str
    user_id: str


def _run(home: Path, args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GNUPGHOME": str(home), "LC_ALL": "C"}
    try:
        return subprocess.run([GPG, "--batch", "--no-tty", "--no-options", "--homedir", str(home), *args],
                              input=stdin, capture_output=True, env=env, timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise GpgError("gpg is not installed: run scripts/install-deps (Debian package gnupg)") from None


def _home() -> tempfile.TemporaryDirectory[str]:
    # gpg wants its home private (0700), which mkdtemp gives.
    return tempfile.TemporaryDirectory(prefix="garage-gpg-")


def read_keys(data: bytes) -> list[PublicKey]:
    """The public keys in `data` (armored or binary); GpgError for a secret key or no key."""
    with _home() as home:
        p = _run(Path(home), ["--with-colons", "--import-options", "show-only", "--import"], data)
    fpr, uid, secret = "", "", False
    pending: list[tuple[str, str]] = []
    for line in p.stdout.decode("utf-8", "replace").splitlines():
        f = line.split(":")
        if f[0] in ("pub", "sec"):
            if fpr:
                pending.append((fpr, uid))
            fpr, uid = "", ""
            secret = secret or f[0] == "sec"
        elif f[0] == "fpr" and not fpr and len(f) > 9:
            fpr = f[9]
        elif f[0] == "uid" and not uid and len(f) > 9:
            uid = f[9]
    if fpr:
        pending.append((fpr, uid))
    if secret:
        # Refused before anything is kept: the head needs only the public half, and a secret
        # key in its state directory would let anyone who reads it sign a release.
        raise GpgError("this file holds a SECRET key: give the head only the public key "
                       "(`gpg --export --armor KEYID > release-key.asc`), and keep the secret one off the head")
    keys = [PublicKey(f, u) for f, u in pending]
    if not keys:
        raise GpgError("this file holds no OpenPGP public key (export one with `gpg --export --armor KEYID`)")
    return keys


def add_to_keyring(keyring: Path, data: bytes) -> list[PublicKey]:
    """Add the public keys in `data` to `keyring` (made if missing, replaced atomically)."""
    keys = read_keys(data)
    with _home() as home_s:
        home = Path(home_s)
        if keyring.exists():
            _check(_run(home, ["--import"], keyring.read_bytes()), "the head's trusted keyring")
        _check(_run(home, ["--import"], data), "the key")
        out = _run(home, ["--export"])
        _check(out, "the keyring")
    write_private(keyring, out.stdout, mode=0o644)  # public keys: readable, but only root writes
    return keys


def keyring_keys(keyring: Path) -> list[PublicKey]:
    if not keyring.exists():
        return []
    return read_keys(keyring.read_bytes())


def verify_detached(keyring: Path, data: Path, signature: Path) -> str:
    """The fingerprint of the trusted key that made `signature` over `data`; GpgError otherwise."""
    if not keyring.exists():
        raise GpgError("the head trusts no release signing key yet: give it the operator's public key with "
                       "`garage-node head release trust-key FILE`")
    with _home() as home:
        # --trust-model always: being in this keyring is what trust means here (no web of trust).
        p = _run(Path(home), ["--no-default-keyring", "--keyring", str(keyring.resolve()), "--trust-model", "always",
                              "--status-fd", "1", "--verify", str(signature.resolve()), str(data.resolve())])
    verdict = gpgstatus.read(p.stdout, p.returncode)
    if verdict.good:
        return verdict.signer
    if verdict.changed:
        raise GpgError(f"the signature {signature.name} does not match {data.name}: the file was changed after it "
                       "was signed (or signed by another build); nothing was stored")
    if verdict.unknown_key:
        key = verdict.missing_key or "?"
        raise GpgError(f"{signature.name} is signed by key {key}, which the head does not trust: sign with the "
                       "operator's key, or trust this one with `garage-node head release trust-key FILE`")
    if verdict.stale_key:
        raise GpgError(f"{signature.name} was made by an expired or revoked key, or has expired: sign again with a "
                       "valid key")
    raise GpgError(f"{signature.name} is not a valid detached signature of {data.name} (gpg exit {p.returncode}): "
                   "make it with `gpg --detach-sign` (mkosi Sign=yes)")


def _check(p: subprocess.CompletedProcess[bytes], what: str) -> None:
    if p.returncode != 0:
        err = p.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GpgError(f"gpg could not read {what}: {err[-1] if err else f'exit {p.returncode}'}")
