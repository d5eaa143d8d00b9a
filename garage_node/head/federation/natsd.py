"""This region's NATS server (Debian's `nats-server`, JetStream on), run by the head as a
supervised child like its Redis (head/gcs.py):
- its configuration in `<state_dir>/federation/nats.conf` (0600): it holds the federation
  password, which never appears on a command line or in a log;
- JetStream's files in `<state_dir>/federation/jetstream`, so the key records and the usage not
  yet read by every other region survive a restart of the server or the head;
- one user, `federation`, with the shared secret: this head and the other regions' heads.

Only JetStream features of nats-server 2.9 (Debian bookworm's 2.9.10) are used: streams with
file storage, key-value buckets, durable pull consumers and `Nats-Msg-Id` de-duplication."""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from garage_node.core.fsutil import write_private
from garage_node.head.setup import SetupError

USER = "federation"


class FederationSetupError(SetupError):
    """Federation cannot start as configured; the message says what to do (`head run` prints it
    and exits, as for any other setup error)."""


@dataclass(frozen=True)
class NatsPaths:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def store(self) -> Path:
        return self.dir / "jetstream"

    @property
    def pid_file(self) -> Path:
        return self.dir / "nats-server.pid"

    @property
    def log(self) -> Path:
        return self.dir / "nats-server.log"


@dataclass(frozen=True)
class NatsServer:
    paths: NatsPaths
    host: str
    port: int
    command: str
    server_name: str
    password: str = field(repr=False)
    tls_cert: Path | None = None  # with its key: clients must speak TLS
    tls_key: Path | None = None

    @property
    def client_url(self) -> str:
        """Where this head reaches its own server (loopback when it listens everywhere)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"nats://{host}:{self.port}"

    def argv(self) -> list[str]:
        return [self.command, "-c", str(self.paths.config)]  # the password is in the file only

    def write_config(self) -> None:
        write_private(self.paths.config, config_text(self).encode())


def config_text(srv: NatsServer) -> str:
    # JSON strings are valid NATS config strings: quoting done once, correctly.
    q = json.dumps
    return "\n".join([
        f"server_name: {q(srv.server_name)}",
        f"listen: {q(f'{srv.host}:{srv.port}')}",
        # A head's own messages and the records of a 60 s partition are small; the bounds keep
        # a runaway from filling the head's disk or memory.
        "max_payload: 1MB",
        "jetstream {",
        f"  store_dir: {q(str(srv.paths.store))}",
        "  max_memory_store: 64MB",
        "  max_file_store: 2GB",
        "}",
        *([ "tls {", f"  cert_file: {q(str(srv.tls_cert))}", f"  key_file: {q(str(srv.tls_key))}", "  timeout: 5",
             "}"] if srv.tls_cert and srv.tls_key else []),
        "authorization {",
        f"  users: [ {{ user: {q(USER)}, password: {q(srv.password)} }} ]",
        "}",
        "",
    ])


def read_secret(path: Path) -> str:
    """The federation secret, from its 0600 file; a clear error when it is missing or open to others."""
    if not path.exists():
        raise FederationSetupError(
            f"{path} is missing: make the federation secret once with `garage-node head federation secret` "
            "on one head and copy that file (mode 0600) to the same place on every other region's head")
    if path.stat().st_mode & 0o077:
        raise FederationSetupError(f"{path} is readable by others: `chmod 600 {path}` (it holds the federation secret)")
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise FederationSetupError(f"{path} holds no usable secret (under 32 characters): make a new one with "
                                   "`garage-node head federation secret --new` and copy it to every head")
    return secret


def make_secret(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, (secrets.token_urlsafe(32) + "\n").encode())


def client_tls(ca_file: Path) -> ssl.SSLContext:
    """Trust exactly one region's CA. Its name is not checked: the CA is that region's alone and
    signs only its head's certificate (as a join token pins it), and heads are often reached at
    addresses their certificate does not name (a NAT, a relay)."""
    if not ca_file.exists():
        raise FederationSetupError(f"{ca_file} is missing: copy that region's head CA (<state_dir>/pki/ca.pem) here")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def open_server(dir: Path, host: str, port: int, command: str, server_name: str, password: str,
                tls_cert: Path | None = None, tls_key: Path | None = None) -> NatsServer:
    exe = command or shutil.which("nats-server") or ""
    if not exe:
        raise FederationSetupError("nats-server is not installed: `apt-get install nats-server` (scripts/install-deps "
                                   "installs it), or set [federation] nats_command")
    paths = NatsPaths(dir)
    paths.dir.mkdir(parents=True, exist_ok=True)
    paths.dir.chmod(0o700)
    return NatsServer(paths, host, port, exe, server_name, password, tls_cert, tls_key)
