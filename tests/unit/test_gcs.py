"""The head's GCS store (#10): a real redis-server with the config the head writes."""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from garage_node.core.raycmd import RAY_PORTS
from garage_node.head.gcs import open_store, ping
from garage_node.head.ray import HEALTH_CHECK_ENV, head_argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_store_files_are_private_and_the_password_hidden(tmp_path):
    store = open_store(tmp_path / "redis", 6390, command="/usr/bin/redis-server")
    assert store is not None
    assert (store.paths.password.stat().st_mode & 0o777) == 0o600
    assert (store.paths.dir.stat().st_mode & 0o777) == 0o700
    assert len(store.password) == 64 and store.password not in repr(store)
    store.write_config()
    assert (store.paths.config.stat().st_mode & 0o777) == 0o600
    text = store.paths.config.read_text()
    assert "bind 127.0.0.1\n" in text and f"requirepass {store.password}" in text and "appendonly yes" in text
    assert store.password not in " ".join(store.argv())  # on no command line
    assert store.ray_env() == {"RAY_REDIS_ADDRESS": "127.0.0.1:6390"}
    again = open_store(tmp_path / "redis", 6390, command="/usr/bin/redis-server")
    assert again.password == store.password  # made once, kept


def test_no_redis_server_means_no_store(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert open_store(tmp_path / "redis", 6390) is None


def test_ray_head_argv_and_health_checks():
    argv = head_argv("ray", "100.96.0.1", RAY_PORTS, Path("/tmp/x"), "eu", redis_password="pw")
    assert argv[argv.index("--redis-password") + 1] == "pw"
    assert "--redis-password" not in head_argv("ray", "100.96.0.1", RAY_PORTS, Path("/tmp/x"), "eu")
    period = int(HEALTH_CHECK_ENV["RAY_health_check_period_ms"])
    timeout = int(HEALTH_CHECK_ENV["RAY_health_check_timeout_ms"])
    threshold = int(HEALTH_CHECK_ENV["RAY_health_check_failure_threshold"])
    # A PC cut off: the next check starts within a period, then `threshold` checks each wait
    # their timeout and a period (19 s measured with 2 s / 2 s / 5, as this predicts).
    assert (period + threshold * (timeout + period)) / 1000 <= 15  # dead in Ray within 15 s


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/install-deps)")
def test_a_real_redis_with_the_heads_config_keeps_its_data_across_a_restart(tmp_path):
    store = open_store(tmp_path / "redis", free_port())
    store.write_config()

    def start():
        proc = subprocess.Popen(store.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not store.ready():
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not come up"
            time.sleep(0.05)
        return proc

    def resp(*args: str) -> bytes:  # one command in Redis' protocol
        return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)

    def command(*args: str) -> bytes:
        with socket.create_connection(("127.0.0.1", store.port), timeout=5) as s:
            s.sendall(resp("AUTH", store.password) + resp(*args))
            time.sleep(0.2)
            return s.recv(4096)

    proc = start()
    try:
        assert not ping("127.0.0.1", store.port, "wrong" * 8)
        assert b"+OK" in command("SET", "cluster", "kept")
    finally:
        proc.terminate()  # as the head stops it: SIGTERM, Redis writes its file out
        proc.wait(timeout=20)
    proc = start()
    try:
        assert b"kept" in command("GET", "cluster")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
