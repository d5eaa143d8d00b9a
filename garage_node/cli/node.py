"""The node's commands: run, status, join, drain, resume, screen, plan."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from garage_node.cli import nodeupdate
from garage_node.core.wire import encode
from garage_node.node.config import load_node_config


def add_commands(sub) -> None:
    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", type=Path, help="node config (default /etc/garage-node/node.toml, or $GARAGE_NODE_CONFIG)")
        sp.add_argument("--override", type=Path,
                        help="override file laid over it, e.g. the USB stick's garage.toml "
                             "(default /boot/garage/garage.toml, or $GARAGE_NODE_OVERRIDE)")
        sp.add_argument("-v", "--verbose", action="store_true")
        sp.set_defaults(func=func)
        return sp

    cmd("run", run, "run the node agent (what garage-node.service starts)")
    st = cmd("status", status, "show this node's state: GPUs, overlay, head, Ray, engine")
    st.add_argument("--json", action="store_true", help="the status document as JSON (stable keys; see docs/node.md)")
    jn = cmd("join", join, "store a join token for the agent (for a PC set up by hand)")
    jn.add_argument("token", help="the token printed by `garage-node head token create`")
    cmd("drain", drain, "stop taking work: let running requests finish, then stop the engine "
        "(survives reboots until `resume`)")
    cmd("resume", resume, "end a drain: the engine starts serving again")
    cmd("screen", screen, "the live status screen on the PC's monitor, with keys to drain and resume "
        "(what garage-screen.service runs on tty1)")
    pl = cmd("plan", plan, "show which model and vLLM settings fit this PC's GPUs, and the arithmetic")
    pl.add_argument("--json", action="store_true")
    nodeupdate.add_command(cmd)  # `update approve VERSION` (cli/nodeupdate.py)


def run(args) -> int:
    from garage_node.node.agent import Agent
    from garage_node.node.localapi import LocalApi, Routes

    cfg = load_node_config(args.config, args.override)
    agent = Agent(cfg)
    # SIGTERM (systemd stop) and SIGINT (Ctrl-C) both leave cleanly; the loop notices at once.
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    api = LocalApi(cfg.socket_path, Routes(status=agent.snapshot, reconcile=agent.wake, drain=agent.drain,
                                           resume=agent.resume))
    api.start()
    try:
        agent.serve()
    finally:
        api.stop()
    return 0


def status(args) -> int:
    from garage_node.node.status import fetch, render

    cfg = load_node_config(args.config, args.override)
    doc, running = fetch(cfg)
    print(json.dumps(encode(doc), indent=2) if args.json else render(doc))
    return 0 if running else 3


def screen(args) -> int:
    from garage_node.node.screen import main

    # Loaded by the screen itself, so a broken garage.toml is shown on the screen, not a crash loop.
    return main(lambda: load_node_config(args.config, args.override))


def join(args) -> int:
    from garage_node.core import token
    from garage_node.core.fsutil import write_private
    from garage_node.node import identity
    from garage_node.node.localapi import AgentClient, AgentDown
    from garage_node.node.paths import StatePaths

    cfg = load_node_config(args.config, args.override)
    try:
        token.parse(args.token)
    except token.TokenError as e:
        print(f"garage-node join: {e}", file=sys.stderr)
        return 2
    paths = StatePaths(cfg.node.state_dir)
    current = identity.load(paths)
    if current is not None and not current.revoked:
        print(f"garage-node join: this PC already belongs to a region as node {current.node_id} ({current.api_url}).\n"
              f"To move it to another head: stop the agent, remove {paths.identity}, then join again.", file=sys.stderr)
        return 2
    # A file the agent reads, so the token also reaches an agent started later.
    write_private(paths.join_token, args.token.strip().encode() + b"\n")
    try:
        with AgentClient(cfg.socket_path, timeout=2) as c:
            c.reconcile()
        print("Token stored; the agent is joining now. Watch it with: garage-node status")
    except AgentDown:
        print("Token stored. The agent is not running: start it with `systemctl start garage-node`.")
    return 0


def drain(args) -> int:
    return _drain(args, True)


def resume(args) -> int:
    return _drain(args, False)


def _drain(args, on: bool) -> int:
    from garage_node.node.localapi import AgentClient, AgentDown
    from garage_node.node.paths import StatePaths

    cfg = load_node_config(args.config, args.override)
    what = "Draining: running requests finish, then the engine stops." if on else "Resumed: the engine starts again."
    try:
        with AgentClient(cfg.socket_path, timeout=5) as c:
            c.drain() if on else c.resume()
        print(what + " Watch it with: garage-node status")
        return 0
    except AgentDown:
        pass
    # The agent is down: leave the drain where it will find it when it starts (the same file
    # its own drain writes, so the drain also holds across reboots).
    flag = StatePaths(cfg.node.state_dir).drain_flag
    if on:
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text("drained by garage-node drain\n")
    else:
        flag.unlink(missing_ok=True)
    print(what + " (The agent is not running; it applies this when it starts.)")
    return 0


def plan(args) -> int:
    """The head's assignment and why, when the agent has one (issue #18); then the plan this PC
    makes by itself, with the arithmetic (what it serves without an assignment)."""
    from garage_node.node import gpu
    from garage_node.node.engine.spec import plan_for
    from garage_node.placement import fit as planner
    from garage_node.placement.catalog import CatalogError, catalog_path, load_catalog

    cfg = load_node_config(args.config, args.override)
    status = _agent_status(cfg)
    a = status.assignment if status is not None else None
    inv = gpu.read_inventory()
    local, error = None, ""
    try:
        catalog = load_catalog(catalog_path(cfg.engine.catalog))
        local = plan_for(cfg.engine, inv, catalog)
    except (planner.PlanError, CatalogError) as e:
        error = str(e)
    if args.json:
        doc: dict[str, object] = local.to_dict() if local is not None else {"error": error}
        doc.update(decided_by="head" if a is not None else "this PC", assignment=encode(a) if a else None,
                   assignment_carried_out=_carried(status))
        print(json.dumps(doc, indent=2))
        return 0 if local is not None or a is not None else 1
    if a is not None and status is not None:
        print(_assignment_text(cfg, inv, status))
        print("\nWithout the head, this PC would choose:")
    if local is None:
        print(f"garage-node plan: {error}", file=sys.stderr)
        return 0 if a is not None else 1
    print(local.explain() + "\n" + _image_line(cfg.engine.image, catalog, inv))
    return 0


def _agent_status(cfg):
    """The running agent's status (None: the agent is down: only the local plan is known)."""
    from garage_node.core.wire import WireError
    from garage_node.node.localapi import AgentClient, AgentDown

    try:
        with AgentClient(cfg.socket_path, timeout=5) as c:
            return c.status()
    except (AgentDown, WireError):
        return None


def _carried(status) -> bool | None:
    if status is None or status.assignment is None or status.placement is None:
        return None
    return status.placement.assignment_generation >= status.assignment.generation


def _assignment_text(cfg, inv, status) -> str:
    """The head's assignment in words: what, on which GPUs, why, where it stands, and the
    engine's arguments it makes on this PC."""
    from garage_node.node.engine.spec import EngineConfigError, assigned_spec
    from garage_node.node.status import placement_lines

    a = status.assignment
    if a.model is None:
        lines = [f"Assigned by the head (generation {a.generation}): serve nothing now"]
    else:
        parallel = f"TP {a.tensor_parallel_size}" + (f", PP {a.pipeline_parallel_size}" if a.pipeline_parallel_size > 1 else "")
        lines = [f"Assigned by the head (generation {a.generation}): {a.model}"
                 + (f" {a.quantization}" if a.quantization else "")
                 + (f", context {a.max_model_len}" if a.max_model_len else "")
                 + (f", GPUs {list(a.gpu_indices)}, {parallel}" if a.gpu_indices else "")
                 + (f", layers per stage {list(a.layer_partition)}" if a.layer_partition else "")
                 + (", weights from the head's store" if a.weights_path else "")]
    lines.append(f"why: {a.reason or 'the head gave no reason'}")
    lines += [f"now: {text}" for text in placement_lines(status)[:1]]
    lines += [f"refused: {p.message}" for p in status.problems if p.source == "placement"]
    if a.model is not None:
        try:
            spec, why = assigned_spec(cfg.engine, inv, "0.0.0.0", "", a)
            lines.append(f"engine: {why}; {' '.join(spec.args)}"
                         + "".join(f"; {k}={v}" for k, v in spec.env if k == "VLLM_PP_LAYER_PARTITION"))
        except EngineConfigError as e:
            lines.append(f"engine: cannot be planned here: {e}")
    return "\n".join(lines)


def _image_line(image: str, catalog, inv) -> str:
    """What the plan assumed of the engine image (the planner refused it otherwise)."""
    from garage_node.placement import cuda

    facts = catalog.image(image)
    if facts is None:
        return f"engine image: {image} (not in the catalog: its CUDA is checked against the driver once pulled)"
    note = cuda.check(image, facts.cuda, inv.driver_version, inv.cuda_version)
    return (f"engine image: {image}, CUDA {cuda.fmt(facts.cuda)}, needs driver >= {cuda.fmt_driver(facts.min_driver)}"
            f" and cc >= {facts.min_compute_capability[0]}.{facts.min_compute_capability[1]}; this node: driver "
            f"{inv.driver_version} (CUDA {inv.cuda_version})" + (f"; {note}" if note else ""))
