"""Small pure pieces: WireGuard dump parsing, keys, backoff, status rendering, sd_notify, Ray args."""

import os
import socket
import sys
import time
from pathlib import Path

from garage_node.core import sdnotify
from garage_node.core.backoff import Backoff
from garage_node.node.gpu import Inventory
from garage_node.core.supervise import Supervised
from garage_node.core.raycmd import label_value
from garage_node.core.wire import Versions
from garage_node.node.ray import ray_worker_command, worker_argv, worker_labels
from garage_node.node.raystart import with_runtime_env_agent_port
from garage_node.node.status import render
from garage_node.core.wireguard import generate_private_key, parse_dump, public_key_of
from garage_node.core.wire import Status, decode
from testing.agentrig import gpu
from testing.fakes import FakeClock

DUMP = (
    "PRIVATEKEYSHOULDNOTAPPEAR=\tPUB=\t51820\toff\n"
    "peerA=\t(none)\t10.0.0.2:51820\t100.96.0.2/32\t1700000000\t100\t200\t25\n"
    "peerB=\t(none)\t(none)\t100.96.0.3/32,100.96.1.0/24\t0\t0\t0\toff\n"
)


def test_parse_dump_skips_interface_line():
    peers = parse_dump(DUMP)
    assert [p.public_key for p in peers] == ["peerA=", "peerB="]
    assert peers[0].endpoint == "10.0.0.2:51820" and peers[0].latest_handshake == 1700000000
    assert peers[1].endpoint is None and peers[1].allowed_ips == ("100.96.0.3/32", "100.96.1.0/24")
    assert peers[1].handshake_age_s() is None
    assert peers[0].handshake_age_s(now=1700000010) == 10
    assert "PRIVATE" not in repr(peers)


def test_wireguard_keys():
    k = generate_private_key()
    assert len(k) == 44 and public_key_of(k) == public_key_of(k) != k


def test_backoff_grows_caps_and_resets():
    b = Backoff(1.0, 8.0)
    delays = [b.next_delay() for _ in range(6)]
    assert 0.5 <= delays[0] <= 1.0 and all(4.0 <= d <= 8.0 for d in delays[4:])
    b.reset()
    assert b.next_delay() <= 1.0


def test_supervised_restarts_with_backoff(tmp_path):
    # The backoff is decided on a clock the test moves, so the machine's speed cannot matter.
    clock = FakeClock()
    child = Supervised("echo", tmp_path / "log", Backoff(10, 20), clock=clock)
    argv = [sys.executable, "-c", "print('hello from child'); raise SystemExit(3)"]
    assert child.ensure(argv)
    deadline = time.time() + 30  # only waits for the real child to exit
    while child.state.restarts == 0 and time.time() < deadline:
        child.poll()
        time.sleep(0.05)
    assert child.state.last_exit_code == 3 and "hello from child" in child.state.last_lines
    assert not child.ensure(argv)  # still in backoff (5-10 s on the test's clock)
    clock.advance(4.9)
    assert not child.ensure(argv)
    clock.advance(5.2)
    assert child.ensure(argv)
    child.stop()


def test_supervised_stop_ends_process_group(tmp_path):
    child = Supervised("sleeper", tmp_path / "log", Backoff())
    child.ensure(["sh", "-c", "sleep 60 & sleep 60"])
    pid = child.state.pid
    child.stop(timeout_s=5)
    assert not child.running

    def group_alive() -> bool:
        try:
            os.killpg(pid, 0)
            return True
        except ProcessLookupError:
            return False
    deadline = time.time() + 10  # the background sleep is reaped by init, a moment later
    while group_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive()


def test_supervised_ends_what_an_exited_child_left_behind(tmp_path):
    child = Supervised("parent", tmp_path / "log", Backoff(5, 5))
    # The leader exits at once; its background sleep (a raylet's agents, say) would live on.
    child.ensure(["sh", "-c", "sleep 60 & echo $! > " + str(tmp_path / "left.pid")])
    deadline = time.time() + 10
    while child.state.restarts == 0 and time.time() < deadline:
        child.poll()
        time.sleep(0.05)
    assert child.state.restarts == 1
    left = int((tmp_path / "left.pid").read_text())

    def living(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False
    deadline = time.time() + 10
    while living(left) and time.time() < deadline:
        time.sleep(0.05)
    assert not living(left)


def test_sd_notify_fallback_sends_datagram(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify._notify_socket("READY=1\nSTATUS=ok")
    assert srv.recv(100) == b"READY=1\nSTATUS=ok"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify._notify_socket("READY=1")


def test_versions_mismatch_message():
    assert Versions("2.60.0", "3.11").mismatch(Versions("2.60.0", "3.11")) is None
    msg = Versions("2.59.0", "3.11").mismatch(Versions("2.60.0", "3.11"))
    assert "Ray 2.59.0 here but the head runs Ray 2.60.0" in msg and "ray==2.60.0" in msg


def test_worker_args_count_only_healthy_gpus():
    inv = Inventory((gpu(0), gpu(1, healthy=False)), "550", "12.4")
    labels = worker_labels("nabc", "eu west", inv)
    assert labels == {"garage.node_id": "nabc", "garage.region": "eu-west",
                      "garage.gpu": "NVIDIA-GeForce-RTX-4090", "garage.gpu_count": "1"}
    argv = worker_argv(["ray"], "100.96.0.1:6379", "100.96.0.2", "/tmp/r", labels, inv, memory_mib=1024)
    assert argv[argv.index("--num-gpus") + 1] == "1"
    assert argv[argv.index("--resources") + 1] == '{"vram_mib": 24564}'
    assert argv[argv.index("--memory") + 1] == str(1024 * 1024 * 1024)
    cpu = worker_argv(["ray"], "h:1", "ip", "/tmp/r", {}, Inventory(nvml_error="no driver"))
    assert "--resources" not in cpu and cpu[cpu.index("--num-gpus") + 1] == "0"
    assert label_value("  ") == "none" and len(label_value("x" * 100)) == 63


def base_status(**kw) -> Status:
    s = {
        "state": "joined", "message": "joined as 100.96.0.2", "node_id": "nabc", "name": "pc", "region": "eu",
        "gpus": [vars(gpu(0)), vars(gpu(1, healthy=False))], "gpu_note": None,
        "driver_version": "550.54.14", "cuda_version": "12.4",
        "overlay": {"interface": "garage0", "up": True, "address": "100.96.0.2", "hub_ip": "100.96.0.1",
                    "hub_endpoint": "203.0.113.10:51820", "handshake_age_s": 12.0},
        "head": {"api_url": "https://h:8443", "reachable": True, "last_contact_age_s": 3.0, "error": None},
        "ray": {"state": "alive", "address": "100.96.0.1:6379", "alive_at_head": True, "pid": 1, "restarts": 0,
                "last_exit_code": None, "resources": {"GPU": 1, "vram_mib": 24564}},
        "engine": {"state": "disabled", "message": ""},
        "versions": {"agent": "0.1.0", "ray": "2.60.0", "python": "3.11"},
        "last_error": None,
        "agent": {"pid": 1, "uptime_s": 5.0},
    }
    s.update(kw)
    return decode(s, Status)


def test_render_joined_node():
    text = render(base_status())
    assert "● joined" in text and "handshake 12s ago" in text and "UNHEALTHY: GPU is lost" in text
    assert "worker alive at the Ray head" in text and "Problem:   none" in text


def test_render_problem_with_hint_and_cpu_node():
    s = base_status(state="degraded", gpus=[], gpu_note="NVIDIA driver not found",
                    head={"api_url": "https://h:8443", "reachable": False, "last_contact_age_s": None, "error": "refused"},
                    last_error={"message": "head unreachable", "hint": "check the head", "age_s": 1, "retry_in_s": 4.0})
    text = render(s)
    assert "CPU node (NVIDIA driver not found)" in text and "UNREACHABLE: refused" in text
    assert "head unreachable (retrying in 4 s)" in text and "To fix:  check the head" in text


def test_supervised_ends_an_orphan_left_by_a_crashed_agent(tmp_path):
    pid_file = tmp_path / "child.pid"
    first = Supervised("sleeper", tmp_path / "log", Backoff(), pid_file=pid_file)
    first.ensure(["sleep", "60"])
    orphan = first.state.pid
    assert int(pid_file.read_text()) == orphan
    # A new agent (the first one "crashed" without stopping its child) starts the same child.
    second = Supervised("sleeper", tmp_path / "log", Backoff(), pid_file=pid_file)
    second.ensure(["sleep", "60"])
    first._proc.wait(timeout=10)  # the orphan was ended
    assert second.state.pid != orphan and int(pid_file.read_text()) == second.state.pid
    second.stop()
    assert not pid_file.exists()


def test_raystart_gives_the_runtime_env_agent_a_port():
    argv = with_runtime_env_agent_port(["start", "--block"])
    port = int(argv[argv.index("--runtime-env-agent-port") + 1])
    assert 0 < port < 65536
    given = ["start", "--runtime-env-agent-port", "7001"]
    assert with_runtime_env_agent_port(given) == given


def test_raystart_hooks_exist_in_the_pinned_ray():
    """garage_node.node.raystart leans on Ray internals; a Ray upgrade that moves them fails here."""
    import ray._private.node as node_module
    import ray._private.utils as ray_utils
    from ray._raylet import (DASHBOARD_AGENT_LISTEN_PORT_NAME, METRICS_AGENT_PORT_NAME,  # noqa: F401
                             METRICS_EXPORT_PORT_NAME, persist_port)  # noqa: F401
    import inspect
    source = inspect.getsource(node_module.Node)
    assert "self._session_dir =" in source and "self._node_id =" in source
    assert hasattr(node_module.Node, "start_raylet") and hasattr(ray_utils, "get_dashboard_dependency_error")
    # garage-node ships Ray without the dashboard extras: the agent is the minimal one.
    assert ray_utils.get_dashboard_dependency_error() is not None


def test_node_runs_ray_through_raystart():
    assert ray_worker_command("") == [sys.executable, "-m", "garage_node.node.raystart"]
    assert ray_worker_command("/opt/ray/bin/ray") == ["/opt/ray/bin/ray"]
