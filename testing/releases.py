"""Throwaway OpenPGP keys and signed release directories for the tests of the head's releases,
made with the real gpg as the operator would (GNUPGHOME in a temporary directory)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from garage_node.core import releasefiles as rf
from garage_node.core.raycmd import local_versions


@dataclass
class SigningKey:
    home: Path  # GNUPGHOME holding the secret key
    fingerprint: str
    public: Path  # the armored public key, as `head release trust-key` takes it
    secret: Path  # the armored secret key (a test gives it to trust-key, which must refuse it)

    def sign(self, file: Path) -> Path:
        sig = file.with_name(file.name + ".gpg")
        sig.unlink(missing_ok=True)
        _gpg(self.home, "--local-user", self.fingerprint, "--output", str(sig), "--detach-sign", str(file))
        return sig

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], capture_output=True, check=False)
        shutil.rmtree(self.home, ignore_errors=True)


def _gpg(home: Path, *args: str) -> bytes:
    env = {**os.environ, "GNUPGHOME": str(home)}
    p = subprocess.run(["gpg", "--batch", "--no-tty", "--pinentry-mode", "loopback", "--passphrase", "", *args],
                       capture_output=True, env=env, timeout=60, check=False)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def make_key(out_dir: Path, name: str = "Release Test") -> SigningKey:
    # A short home under /tmp: gpg-agent's socket path must fit a unix socket's 108 bytes.
    home = Path(tempfile.mkdtemp(prefix="gk-"))
    _gpg(home, "--quick-gen-key", f"{name} <release-test@example.invalid>", "ed25519", "sign", "never")
    colons = _gpg(home, "--with-colons", "--list-secret-keys").decode()
    fpr = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
    out_dir.mkdir(parents=True, exist_ok=True)
    public = out_dir / f"{name.replace(' ', '-')}.pub.asc"
    public.write_bytes(_gpg(home, "--armor", "--export", fpr))
    secret = out_dir / f"{name.replace(' ', '-')}.sec.asc"
    secret.write_bytes(_gpg(home, "--armor", "--export-secret-keys", fpr))
    return SigningKey(home, fpr, public, secret)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SigningKey, SigningKey]]:
    """The operator's signing key and a stranger's, for a test module (import it as a fixture)."""
    d = tmp_path_factory.mktemp("keys")
    operator, stranger = make_key(d, "Operator"), make_key(d, "Stranger")
    yield operator, stranger
    operator.close()
    stranger.close()


def write_sums(d: Path) -> Path:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()} *{p.name}\n"
             for p in sorted(d.iterdir()) if p.name not in (rf.SUMS, rf.SIGNATURE)]
    (d / rf.SUMS).write_text("".join(lines))
    return d / rf.SUMS


def make_release(d: Path, version: str, key: SigningKey | None, *, ray: str | None = None,
                 python: str | None = None, root_bytes: bytes = b"") -> Path:
    """A release directory as build-image.sh will write it, signed by `key` (None: unsigned)."""
    d.mkdir(parents=True)
    v = local_versions()
    root = f"garage-node_{version}.root.raw"
    uki = f"garage-node_{version}.efi"
    (d / root).write_bytes(root_bytes or os.urandom(256 * 1024))
    (d / uki).write_bytes(b"MZ" + os.urandom(32 * 1024))
    manifest = {"format": rf.FORMAT, "version": version, "variant": "base", "python": python or v.python,
                "ray": ray or v.ray, "root": root, "uki": uki, "agent": "0.1.0", "built_at": "2026-12-06T12:00:00Z"}
    (d / rf.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    write_sums(d)
    if key is not None:
        key.sign(d / rf.SUMS)
    return d
