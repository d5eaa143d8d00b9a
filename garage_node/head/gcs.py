"""Ray's GCS fault tolerance on the head: a Redis of the head's own holds the GCS's state.

Without it a head that restarts (a crash, an upgrade, kill -9) starts a new Ray cluster, and
every PC's raylet dies on the new cluster id only when it reaches the new GCS (58-60 s
measured for three PCs). With it, the restarted GCS loads the same cluster from Redis and the
raylets, which keep retrying the GCS meanwhile (`RAY_gcs_rpc_server_reconnect_timeout_s`,
core/raycmd.py), reconnect with their node ids.

Redis is Debian's `redis-server`, run by the head as a supervised child (core/supervise.py):
- bound to 127.0.0.1 only: the GCS, the one client, runs on the head itself, and nothing in the
  overlay needs it (a PC's raylet talks to the GCS, never to Redis), so a PC owner cannot even
  knock on it;
- with a password from `<state_dir>/redis/password` (0600, made once), written into a 0600
  config file that redis-server reads (never on redis-server's command line);
- with an append-only file in `<state_dir>/redis/` (fsync every second), so a Redis that dies
  with the head, or is ended by the next head as a leftover, comes back with the cluster.

Ray itself only takes the password on `ray start --redis-password`; see docs/operating.md
(Security, the head's Redis) for where Ray passes it on.
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from garage_node.core.fsutil import write_private

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class RedisPaths:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "redis.conf"

    @property
    def password(self) -> Path:
        return self.dir / "password"

    @property
    def pid_file(self) -> Path:
        return self.dir / "redis.pid"


@dataclass(frozen=True)
class GcsStore:
    """The Redis behind the head's GCS: where it lives, its port and its password."""

    paths: RedisPaths
    port: int
    command: str
    password: str = field(repr=False)

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def argv(self) -> list[str]:
        # The config file carries the password: nothing secret on the command line.
        return [self.command, str(self.paths.config)]

    def ray_env(self) -> dict[str, str]:
        """For the Ray head: where its GCS keeps its state."""
        return {"RAY_REDIS_ADDRESS": self.address}

    def write_config(self) -> None:
        # Rewritten at every start (port or directory may have changed); 0600: it holds the password.
        write_private(self.paths.config, config_text(self.paths.dir, self.port, self.password).encode())

    def ready(self, timeout_s: float = 1.0) -> bool:
        """Redis answers an authenticated PING (it is loading its file until then)."""
        return ping(LOCALHOST, self.port, self.password, timeout_s)


def open_store(dir: Path, port: int, command: str = "") -> GcsStore | None:
    """The head's Redis; None when `redis-server` is not installed (the head then runs its Ray
    without fault tolerance and says so)."""
    exe = command or shutil.which("redis-server") or ""
    if not exe:
        return None
    paths = RedisPaths(dir)
    paths.dir.mkdir(parents=True, exist_ok=True)
    paths.dir.chmod(0o700)
    if not paths.password.exists():
        import secrets

        write_private(paths.password, secrets.token_hex(32).encode())
    return GcsStore(paths, port, exe, paths.password.read_text().strip())


def config_text(dir: Path, port: int, password: str) -> str:
    return "\n".join([
        f"bind {LOCALHOST}",
        "protected-mode yes",
        f"port {port}",
        "daemonize no",
        "supervised no",
        'logfile ""',  # to stdout, which the supervisor writes to the head's log directory
        f"dir {dir}",
        # The GCS's state survives Redis' own restart: an append-only file, fsync'd every second
        # (a crash loses at most that second of GCS writes; the raylets re-report their state).
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        # A few MB hold a region's GCS; a bound keeps a runaway from taking the head's memory.
        "maxmemory 512mb",
        "maxmemory-policy noeviction",
        f"requirepass {password}",
        "",
    ])


def ping(host: str, port: int, password: str, timeout_s: float = 1.0) -> bool:
    """AUTH then PING in Redis' own protocol (RESP); no client library needed for two commands."""
    def command(*args: str) -> bytes:
        out = f"*{len(args)}\r\n".encode()
        for a in args:
            b = a.encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        return out

    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(command("AUTH", password) + command("PING"))
            deadline = time.monotonic() + timeout_s
            got = b""
            while got.count(b"\r\n") < 2 and time.monotonic() < deadline:
                chunk = s.recv(256)
                if not chunk:
                    break
                got += chunk
        return got.startswith(b"+OK\r\n+PONG\r\n")
    except OSError:
        return False
