"""The PC's screen (`garage-node screen`): the layout as a pure function of the status document,
the block letters, when it is safe to power off, and the keys' drain/resume with the agent down.
No terminal needed; the QEMU image test reads the real screen back from a screenshot."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from garage_node.core.wire import (GPU, AgentInfo, AgentVersions, EngineState, EngineStatus, HeadStatus, NodeState,
                                   OverlayStatus, ProblemStatus, RayResources, RayState, RayStatus, Status)
from garage_node.node import screen
from garage_node.node.config import NodeConfig, NodeSection
from garage_node.node.screen import BIG_FONT, BLOCK, Line, big_text, layout, power_off_advice
from garage_node.node.status import render

NOW = 1_790_000_000.0


def gpu(index: int = 0, **kw) -> GPU:
    base = dict(index=index, name="NVIDIA GeForce RTX 4090", uuid=f"GPU-{index}", memory_total_mib=24564,
                memory_free_mib=20000, compute_capability="8.9", temperature_c=41, power_w=28.4, utilization_pct=3)
    return GPU(**{**base, **kw})


def joined(**kw) -> Status:
    base = dict(
        state=NodeState.JOINED, message="joined as 100.96.0.2; Ray worker alive at the head (2 GPUs)",
        node_id="n271a89f1f1", name="alice-pc", region="testbed",
        gpus=[gpu(0), gpu(1, name="NVIDIA GeForce RTX 4060", temperature_c=38, power_w=12.0, utilization_pct=0)],
        gpu_note=None, driver_version="550.54.14", cuda_version="12.4",
        overlay=OverlayStatus(interface="garage0", up=True, address="100.96.0.2", hub_ip="100.96.0.1",
                              hub_endpoint="10.231.124.1:51820", handshake_age_s=12.0),
        head=HeadStatus(api_url="https://10.231.124.1:8443", reachable=True, last_contact_age_s=1.0),
        ray=RayStatus(state=RayState.ALIVE, address="100.96.0.1:6379", alive_at_head=True,
                      resources=RayResources(GPU=2, vram_mib=32752)),
        engine=EngineStatus(state=EngineState.HEALTHY, message="serving garage/tiny-llama-test",
                            model="garage/tiny-llama-test", requests_running=2, requests_waiting=1,
                            generation_tokens_per_s=48.3, draining=False),
        versions=AgentVersions("0.1.0", "2.60.0", "3.11"), last_error=None, agent=AgentInfo(pid=42, uptime_s=600.0),
    )
    return Status(**{**base, **kw})


def text(lines: list[Line]) -> str:
    return "\n".join(line.text for line in lines)


def big_word(lines: list[Line]) -> str:
    """Read the block letters back (as the image test does from pixels)."""
    rows = [line.text for line in lines if line.style == "big"]
    assert len(rows) == screen.BIG_HEIGHT
    width = max(len(r) for r in rows)
    rows = [r.ljust(width) for r in rows]
    left = min(len(r) - len(r.lstrip()) for r in rows if r.strip())
    rows = [r[left:] for r in rows]
    width -= left
    # The narrowest solid run is one letter pixel (1 or 2 columns).
    runs = [len(run) for r in rows for run in r.replace(" ", "\0").split("\0") if run]
    scale = min(runs)
    rows = [r[::scale] for r in rows]
    glyphs = {g: ch for ch, g in BIG_FONT.items()}
    word = ""
    for x in range(0, len(rows[0]), screen.BIG_WIDTH + 1):
        word += glyphs[tuple(r[x:x + screen.BIG_WIDTH].ljust(screen.BIG_WIDTH) for r in rows)]
    return word


# ---------------------------------------------------------------- the letters


def test_every_glyph_is_a_full_5x5_and_touches_its_edges():
    for ch, glyph in BIG_FONT.items():
        assert len(glyph) == screen.BIG_HEIGHT and all(len(r) == screen.BIG_WIDTH for r in glyph), ch
        assert set("".join(glyph)) <= {BLOCK, " "}, ch
        if ch.isalpha():  # the image test measures the cell size from the word's outline
            assert glyph[0].strip() and glyph[-1].strip(), ch
            assert any(r[0] == BLOCK for r in glyph) and any(r[-1] == BLOCK for r in glyph), ch
    assert len({g for g in BIG_FONT.values()}) == len(BIG_FONT), "two letters look the same"


@pytest.mark.parametrize("state", [s.value for s in NodeState])
def test_every_state_word_fits_80_columns_and_reads_back(state):
    rows = big_text(state)
    assert max(len(r) for r in rows) <= 76
    lines = layout(joined(state=NodeState(state)), 80, 25, now=NOW)
    assert big_word(lines) == state.upper()


def test_wide_screen_doubles_the_letters():
    narrow, wide = big_text("joined", 1), big_text("joined", 2)
    assert len(wide[0]) == 2 * len(narrow[0]) and wide[0] == "".join(c * 2 for c in narrow[0])
    lines = layout(joined(), 160, 50, now=NOW)
    assert big_word(lines) == "JOINED"
    assert max(len(line.text) for line in lines if line.style == "big") > 80


# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize("size", [(80, 25), (100, 30), (160, 50)])
def test_layout_fits_the_console(size):
    w, h = size
    for doc in (joined(), problem(), drained()):
        lines = layout(doc, w, h, now=NOW, note="Drain asked: running requests finish, then the engine stops.")
        assert len(lines) == h
        assert all(len(line.text) <= w for line in lines)
        # The console's font: ASCII, the degree sign and the block.
        assert all(ord(c) < 128 or c in "°█" for line in lines for c in line.text), text(lines)
        assert "Alt+F2" in lines[-1].text and "d  drain" in lines[-2].text


def test_joined_node_shows_name_gpus_model_and_load():
    out = text(layout(joined(), 80, 25, now=NOW))
    assert out.splitlines()[0].startswith("garage-node  alice-pc  (n271a89f1f1)  region testbed")
    assert "State:    joined: joined as 100.96.0.2" in out
    assert "GPU 0:    RTX 4090  41°C  28 W  3% busy  ok" in out
    assert "GPU 1:    RTX 4060  38°C  12 W  0% busy  ok" in out
    assert "Model:    garage/tiny-llama-test  2 requests running, 1 waiting, 48.3 tokens/s" in out
    assert "Problem:  none" in out
    assert "Served:" not in out  # the head has not said: no line, not a made-up zero
    assert "SAFE TO POWER OFF" not in out


def test_tokens_served_when_the_head_says():
    from garage_node.core.wire import TokensServed

    out = text(layout(joined(tokens_served=TokensServed(today=12345, total=9876543)), 80, 25, now=NOW))
    assert "Served:   12,345 tokens today, 9,876,543 in total" in out


def test_unhealthy_gpu_and_cpu_node():
    doc = joined(gpus=[gpu(0), gpu(1, healthy=False, error="NVML: GPU is lost (fell off the bus)", temperature_c=None)])
    lines = layout(doc, 80, 25, now=NOW)
    bad = next(line for line in lines if line.text.startswith("GPU 1:"))
    assert "UNHEALTHY: NVML: GPU is lost (fell off the bus)" in bad.text and bad.style == "alert"
    cpu = text(layout(joined(gpus=[], gpu_note="NVIDIA driver not found"), 80, 25, now=NOW))
    assert "GPUs:     none - CPU node (NVIDIA driver not found)" in cpu


def problem() -> Status:
    return joined(state=NodeState.ERROR, message="the join token is unusable", node_id=None, name="garage-test-node",
                  region=None, overlay=OverlayStatus(interface="garage0", up=False), head=HeadStatus(),
                  ray=RayStatus(state=RayState.STOPPED), engine=EngineStatus(state=EngineState.STARTING,
                  message="waiting for the node to join before starting the engine"), agent=AgentInfo(1, 5.0),
                  last_error=ProblemStatus(
                      message="the join token in config [node] join_token is unusable: the join token is damaged "
                              "(it does not decode); it may be cut short.",
                      hint="Copy the whole token again from `garage-node head token create` on the head.",
                      retry_in_s=None))


def test_problem_in_the_words_of_garage_node_status():
    doc = problem()
    lines = layout(doc, 80, 25, now=NOW)
    assert big_word(lines) == "ERROR"
    screen_words = " ".join(" ".join(line.text[10:].split()) for line in lines if line.style == "alert")
    status_text = render(doc)
    problem_line = next(ln for ln in status_text.splitlines() if ln.startswith("Problem:"))[11:]
    fix_line = next(ln for ln in status_text.splitlines() if ln.startswith("  To fix:"))[11:]
    # Wrapped to the screen's width, word for word the same as `garage-node status`.
    assert problem_line in screen_words and fix_line in screen_words
    assert "State:    error: the join token is unusable" in text(lines)


def test_retry_is_shown():
    doc = problem()
    doc = dataclasses.replace(doc, state=NodeState.ENROLLING, last_error=ProblemStatus(
        message="head unreachable: connection refused", hint="check the PC's network", retry_in_s=17.2))
    out = text(layout(doc, 80, 25, now=NOW))
    assert "head unreachable: connection refused (retrying in 17 s)" in out
    assert "To fix:   check the PC's network" in out


def test_a_long_problem_never_pushes_the_keys_off_the_screen():
    doc = dataclasses.replace(problem(), last_error=ProblemStatus(message="x " * 600, hint="y " * 600))
    lines = layout(doc, 80, 25, now=NOW)
    assert len(lines) == 25 and "Alt+F2" in lines[-1].text
    assert big_word(lines) == "ERROR"


def test_agent_down_uses_offline_status(tmp_path, monkeypatch):
    from garage_node.node.status import offline_status

    cfg = NodeConfig(node=NodeSection(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run", name="bob-pc"))
    monkeypatch.setattr(screen, "_agent_unit_state", lambda: ("inactive", "dead"))
    doc = screen.read_status(cfg)  # nothing listens on the socket
    assert doc.state is NodeState.AGENT_DOWN
    assert doc.last_error.hint == offline_status(cfg, "x").last_error.hint
    lines = layout(doc, 80, 25, now=NOW)
    assert big_word(lines) == "AGENT-DOWN"
    assert "start the agent: systemctl start garage-node" in " ".join(text(lines).split())


def test_agent_starting_is_not_agent_down(tmp_path, monkeypatch):
    """systemd is still starting the agent (a minute under a slow first boot): nothing is wrong yet.
    An agent waiting for its restart after a crash is down, though."""
    cfg = NodeConfig(node=NodeSection(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run"))
    monkeypatch.setattr(screen, "_agent_unit_state", lambda: ("activating", "start"))
    doc = screen.read_status(cfg)
    assert doc.state is NodeState.STARTING and doc.last_error is None
    assert big_word(layout(doc, 80, 25, now=NOW)) == "STARTING"
    monkeypatch.setattr(screen, "_agent_unit_state", lambda: ("activating", "auto-restart"))
    assert screen.read_status(cfg).state is NodeState.AGENT_DOWN


def test_config_error_is_shown_not_crashed():
    doc = screen.config_error_status("garage.toml: [node] nmae: unknown key")
    out = text(layout(doc, 80, 25, now=NOW))
    assert "config error: garage.toml: [node] nmae: unknown key" in out
    assert "fix garage.toml" in out


# ---------------------------------------------------------------- power off


def drained(**engine) -> Status:
    e = dict(state=EngineState.DRAINED, message="drained: no new work; run `garage-node resume` to serve again",
             model="garage/tiny-llama-test", draining=True)
    return joined(engine=EngineStatus(**{**e, **engine}))


def test_not_draining_says_nothing_about_powering_off():
    assert power_off_advice(joined()) is None


@pytest.mark.parametrize("state", [EngineState.DRAINED, EngineState.STOPPED, EngineState.DISABLED])
def test_safe_to_power_off_once_the_engine_is_drained(state):
    advice = power_off_advice(drained(state=state))
    assert advice and advice[0].startswith("SAFE TO POWER OFF") and advice[1] == "ok"
    out = text(layout(drained(state=state), 80, 25, now=NOW))
    assert "SAFE TO POWER OFF" in out and "Press r to serve again" in out


@pytest.mark.parametrize("state", [EngineState.DRAINING, EngineState.HEALTHY, EngineState.RESTARTING])
def test_not_safe_while_requests_may_run(state):
    advice = power_off_advice(drained(state=state, requests_running=3))
    assert advice and "SAFE" not in advice[0] and "Do not power off yet" in advice[0]
    if state is EngineState.DRAINING:
        assert "(3 running)" in advice[0]


def test_not_safe_when_the_agent_cannot_confirm():
    advice = power_off_advice(dataclasses.replace(drained(state=EngineState.UNKNOWN), agent=None))
    assert advice and "SAFE" not in advice[0] and "the agent is not running" in advice[0]


# ---------------------------------------------------------------- keys


def test_keys_drain_and_resume_with_the_agent_down(tmp_path):
    """No agent: the drain file is left where the agent reads it at start (as `garage-node
    drain` does), and resume removes it."""
    cfg = NodeConfig(node=NodeSection(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run"))
    from garage_node.node.paths import StatePaths

    flag = StatePaths(cfg.node.state_dir).drain_flag
    note = screen.set_drain(cfg, True)
    assert flag.exists() and "agent is not running" in note
    note = screen.set_drain(cfg, False)
    assert not flag.exists() and note.startswith("Resume asked")


def test_keys_reach_a_running_agent(tmp_path):
    """With the agent's local API up, `d` and `r` are the agent's own drain and resume."""
    from garage_node.node.localapi import LocalApi, Routes

    calls: list[str] = []
    cfg = NodeConfig(node=NodeSection(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run"))
    api = LocalApi(cfg.socket_path, Routes(status=joined, reconcile=lambda: None, drain=lambda: calls.append("drain"),
                                           resume=lambda: calls.append("resume")))
    api.start()
    try:
        assert screen.read_status(cfg).name == "alice-pc"
        assert screen.set_drain(cfg, True).startswith("Drain asked")
        assert screen.set_drain(cfg, False).startswith("Resume asked")
    finally:
        api.stop()
    assert calls == ["drain", "resume"]


def test_screen_loads_no_web_stack_and_no_ray():
    """The screen runs on the PC beside the agent: the agent's import budget applies."""
    from testing.imports import FORBIDDEN, loaded_after_importing

    loaded = loaded_after_importing(("garage_node.node.screen", "garage_node.cli"))
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_no_secret_on_the_screen(tmp_path):
    """The config's join token never reaches the screen, whatever the agent is doing."""
    token = "gn1.screen-secret-0123456789abcdef-notreal"
    cfg = NodeConfig(node=NodeSection(state_dir=tmp_path / "s", runtime_dir=tmp_path / "r", join_token=token))
    doc = screen.read_status(cfg)
    assert token not in text(layout(doc, 160, 50, now=NOW))
    assert token not in repr(doc)


def test_the_command_is_wired():
    from garage_node.cli import parser

    args = parser().parse_args(["screen"])
    assert args.func.__name__ == "screen"


def test_unit_file():
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "garage-screen.service").read_text()
    for want in ("Conflicts=getty@tty1.service", "TTYPath=/dev/tty1", "StandardInput=tty", "Restart=always",
                 "ExecStart=/opt/garage-node/bin/garage-node screen"):
        assert want in unit, want


def test_the_screen_runs_in_a_terminal(tmp_path):
    """`garage-node screen` in a pseudo-terminal (as on tty1): it draws, `d` leaves the drain
    where the agent reads it (no agent here), `r` takes it back. Waits for output, never for a
    set time."""
    import pty
    import select
    import signal
    import sys
    import time

    from garage_node.node.paths import StatePaths

    conf = tmp_path / "node.toml"
    conf.write_text(f'[node]\nname = "pty-pc"\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    flag = StatePaths(tmp_path / "state").drain_flag
    pid, fd = pty.fork()
    if pid == 0:  # the child: the screen, on the pty
        os.environ.update(TERM="linux", LANG="C.UTF-8", COLUMNS="80", LINES="25")
        os.execv(sys.executable, [sys.executable, "-m", "garage_node.cli", "screen", "--config", str(conf),
                                  "--override", str(tmp_path / "none.toml")])
    out = b""

    def until(cond, what: str, timeout: float = 60) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"{what}; the screen wrote: {out[-2000:]!r}"
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break

    try:
        until(lambda: b"Alt+F2" in out and b"pty-pc" in out, "the screen to draw")
        os.write(fd, b"d")
        until(flag.exists, "d to leave the drain for the agent")
        until(lambda: b"SAFE TO POWER OFF" not in out and b"cannot confirm" in out, "the screen to say it cannot confirm")
        os.write(fd, b"r")
        until(lambda: not flag.exists(), "r to take the drain back")
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)


def test_the_key_answer_shows_until_the_banner_answers_it():
    note = "Drain asked: running requests finish, then the engine stops. Wait for SAFE TO POWER OFF."
    draining = text(layout(drained(state=EngineState.DRAINING), 80, 25, now=NOW, note=note))
    assert "Drain asked" in draining and "DRAINING" in draining and "SAFE" not in draining.replace("Wait for SAFE", "")
    safe = text(layout(drained(), 80, 25, now=NOW, note=note))
    assert "SAFE TO POWER OFF: drained" in safe and "Drain asked" not in safe


def test_the_problem_stays_on_a_full_80x25_screen():
    """Four GPUs, the owner's drain note and a long problem: the problem and what to do stay
    under the state; what is cut comes off the end."""
    doc = dataclasses.replace(problem(), gpus=[gpu(i) for i in range(4)], engine=drained(state=EngineState.DRAINING).engine,
                              agent=AgentInfo(1, 5.0))
    lines = layout(doc, 80, 25, now=NOW, note="Drain asked: running requests finish, then the engine stops. Wait.")
    out = text(lines)
    assert len(lines) == 25 and "Alt+F2" in lines[-1].text
    assert "Problem:  the join token in config" in out and "To fix:   Copy the whole token again" in out
    assert "DRAINING" in out and "Drain asked" in out
    state_row = next(i for i, line in enumerate(lines) if line.text.startswith("State:"))
    assert lines[state_row + 1].text.startswith("Problem:")
