"""The A/B stick's health gate (node/healthgate.py, `garage-node health-gate`): it passes when
garage.toml is valid, the agent answers on its real local socket (node/localapi.py) and Docker
answers /_ping (here a stand-in daemon on a unix socket: the agent's real Docker client talks to
it), whatever the head and the network do; it fails, saying which check, when one of them does
not, after its retry window; on the nvidia variant it fails when NVML sees fewer GPUs than on
the last good boot (NVML itself is a double: no GPU here); a test build's fail file fails it."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from garage_node.cli import main
from garage_node.node import healthgate
from garage_node.node.config import load_node_config
from garage_node.node.localapi import LocalApi, Routes
from garage_node.node.status import offline_status


class _Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Ping(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        ok = self.path.endswith("/_ping")
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"no")

    def address_string(self) -> str:
        return "docker"

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def docker(tmp_path) -> Iterator[Path]:
    sock = tmp_path / "docker.sock"
    server = _Unix(str(sock), _Ping)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield sock
    server.shutdown()
    server.server_close()


def write_config(tmp_path: Path, docker_sock: Path, extra: str = "") -> Path:
    cfg = tmp_path / "node.toml"
    # No head at all (the agent's status says so): not a bad boot.
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
                   f'[engine]\ndocker_socket = "{docker_sock}"\n{extra}')
    return cfg


def start_agent(cfg_path: Path) -> LocalApi:
    cfg = load_node_config(cfg_path, cfg_path.with_name("none.toml"))
    api = LocalApi(cfg.socket_path, Routes(status=lambda: offline_status(cfg, "the head is unreachable"),
                                           reconcile=lambda: None, drain=lambda: None, resume=lambda: None))
    api.start()
    return api


def probes(cfg: Path, variant: str | None = None, gpus: int = 0, test_fail: Path | None = None) -> healthgate.Probes:
    p = healthgate.probes(cfg, cfg.with_name("none.toml"), variant)
    p.gpus_seen = lambda: (gpus, None if gpus else "no NVIDIA GPU found")
    p.test_fail = test_fail or cfg.with_name("no-test-fail")
    return p


def names(failed: list[healthgate.Check]) -> list[str]:
    return [c.name for c in failed]


def test_a_healthy_pc_passes_with_its_head_unreachable(tmp_path, docker):
    cfg = write_config(tmp_path, docker)
    api = start_agent(cfg)
    try:
        assert healthgate.run(probes(cfg), wait_s=0) == []
    finally:
        api.stop()


def test_each_failing_check_is_named_after_the_retry_window(tmp_path, docker):
    cfg = write_config(tmp_path, tmp_path / "no-docker.sock")
    t0 = time.monotonic()
    failed = healthgate.run(probes(cfg), wait_s=1.0, every_s=0.2)
    assert time.monotonic() - t0 >= 1.0  # retried until the window closed
    assert names(failed) == ["agent", "docker"]
    assert "does not answer on" in (failed[0].why or "") and "Docker is not reachable" in (failed[1].why or "")
    # A config that does not parse: nothing else is judged.
    bad = write_config(tmp_path, docker, '[update]\nwhen = "sometimes"\n')
    failed = healthgate.run(probes(bad), wait_s=0)
    assert names(failed) == ["config"] and "garage.toml is not valid" in (failed[0].why or "")


def test_an_agent_that_comes_up_late_passes_within_the_window(tmp_path, docker):
    cfg = write_config(tmp_path, docker)
    apis: list[LocalApi] = []
    timer = threading.Timer(1.0, lambda: apis.append(start_agent(cfg)))
    timer.start()
    try:
        assert healthgate.run(probes(cfg), wait_s=20, every_s=0.2) == []
    finally:
        timer.join()
        for a in apis:
            a.stop()


def test_the_nvidia_variant_needs_the_gpus_of_the_last_good_boot(tmp_path, docker):
    cfg = write_config(tmp_path, docker)
    api = start_agent(cfg)
    try:
        # First good boot: two GPUs, recorded.
        assert healthgate.run(probes(cfg, "nvidia", gpus=2), wait_s=0) == []
        assert healthgate.blessed_gpus(tmp_path / "state") == 2
        # A version whose driver sees one: a bad boot, and the record stays.
        failed = healthgate.run(probes(cfg, "nvidia", gpus=1), wait_s=0)
        assert names(failed) == ["gpus"] and "NVML sees 1 GPU(s) but 2 on the last good boot" in (failed[0].why or "")
        assert healthgate.blessed_gpus(tmp_path / "state") == 2
        # The base variant does not look at GPUs.
        assert healthgate.run(probes(cfg, "base", gpus=0), wait_s=0) == []
    finally:
        api.stop()


def test_a_test_builds_fail_file_fails_it_at_once(tmp_path, docker):
    cfg = write_config(tmp_path, docker)
    api = start_agent(cfg)
    fail = tmp_path / "test-fail-health-gate"
    fail.touch()
    try:
        t0 = time.monotonic()
        failed = healthgate.run(probes(cfg, test_fail=fail), wait_s=30)
        assert names(failed) == ["test-fail"] and time.monotonic() - t0 < 10  # not waited on
    finally:
        api.stop()


def test_the_command(tmp_path, docker, capsys, monkeypatch):
    cfg = write_config(tmp_path, docker)
    args = ["health-gate", "--config", str(cfg), "--override", str(tmp_path / "none.toml"), "--wait", "0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "health-gate: FAIL agent: the agent does not answer on" in err and "boots the other version" in err
    api = start_agent(cfg)
    try:
        assert main(args) == 0
        assert capsys.readouterr().out.startswith("health-gate: ok")
    finally:
        api.stop()
