"""`garage-node`: the agent, its status, and the regional head, in one thin command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError, load_head_config, load_node_config

EX_CONFIG = 78  # sysexits.h: the config is wrong; systemd keeps retrying slowly
EX_UNAVAILABLE = 69

NODE_HELP = """\
The node side. With no token typed anywhere but garage.toml (or `join`), `run` detects the
GPUs, enrolls with the regional head, brings up the WireGuard overlay and runs a Ray worker,
and keeps all of it running. `status` shows how that is going."""

HEAD_HELP = """\
The regional head that nodes join: `init` once, then `run` under systemd
(garage-head.service); `token create` prints a join token for a PC."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"garage-node: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="garage-node", description=NODE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"garage-node {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    def node_cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", type=Path, help="node config (default /etc/garage-node/node.toml, or $GARAGE_NODE_CONFIG)")
        sp.add_argument("--override", type=Path,
                        help="override file laid over it, e.g. the USB stick's garage.toml "
                             "(default /boot/garage/garage.toml, or $GARAGE_NODE_OVERRIDE)")
        sp.add_argument("-v", "--verbose", action="store_true")
        sp.set_defaults(func=func)
        return sp

    node_cmd("run", _cmd_run, "run the node agent (what garage-node.service starts)")
    st = node_cmd("status", _cmd_status, "show this node's state: GPUs, overlay, head, Ray, engine")
    st.add_argument("--json", action="store_true", help="the status document as JSON (stable keys; see README)")
    jn = node_cmd("join", _cmd_join, "store a join token for the agent (for a PC set up by hand)")
    jn.add_argument("token", help="the token printed by `garage-node head token create`")

    node_cmd("drain", _cmd_drain, "stop taking work: let running requests finish, then stop the engine "
             "(survives reboots until `resume`)")
    node_cmd("resume", _cmd_resume, "end a drain: the engine starts serving again")
    pl = node_cmd("plan", _cmd_plan, "show which model and vLLM settings fit this PC's GPUs, and the arithmetic")
    pl.add_argument("--json", action="store_true")

    head = sub.add_parser("head", help="the regional head", description=HEAD_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    hsub = head.add_subparsers(required=True, metavar="COMMAND")

    def head_cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = hsub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", type=Path, help="head config (default /etc/garage-node/head.toml, or $GARAGE_HEAD_CONFIG)")
        sp.add_argument("-v", "--verbose", action="store_true")
        sp.set_defaults(func=func)
        return sp

    head_cmd("init", _cmd_head_init, "create the head's CA, certificate, WireGuard key and registry (safe to repeat)")
    head_cmd("run", _cmd_head_run, "serve the control API, the WireGuard hub and the Ray head")
    tok = head_cmd("token", _cmd_head_token, "create a join token")
    tok.add_argument("action", choices=["create"])
    tok.add_argument("--ttl", type=_duration, help="lifetime, e.g. 30m, 24h, 7d (default from config: 24h)")
    tok.add_argument("--uses", type=int, help="how many PCs may join with it (default: unlimited until it expires)")
    nodes = head_cmd("nodes", _cmd_head_nodes, "list enrolled nodes")
    nodes.add_argument("--json", action="store_true")
    rv = head_cmd("revoke", _cmd_head_revoke, "revoke a node: its peer leaves the hub, its heartbeats are refused")
    rv.add_argument("node", help="node id or name")

    demo = sub.add_parser("demo", help="a head and two nodes on this machine, in network namespaces (needs root)",
                          description="Runs a regional head and two nodes in network namespaces on this machine, "
                                      "with simulated GPUs, prints the network's status, and cleans up.")
    demo.add_argument("--keep", action="store_true", help="leave it running until Ctrl-C")
    demo.add_argument("-v", "--verbose", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return p


# ---------------------------------------------------------------- node


def _cmd_run(args) -> int:
    from .agent import Agent, install_signal_handlers
    from .localapi import LocalApi

    cfg = load_node_config(args.config, args.override)
    agent = Agent(cfg)
    install_signal_handlers(agent)
    api = LocalApi(cfg.socket_path, agent.snapshot, agent.wake)
    api.start()
    try:
        agent.run()
    finally:
        api.stop()
    return 0


def _cmd_status(args) -> int:
    from .status import fetch, render

    cfg = load_node_config(args.config, args.override)
    doc, running = fetch(cfg)
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0 if running else 3


def _cmd_join(args) -> int:
    from . import identity, token
    from .fsutil import write_private
    from .localapi import client

    cfg = load_node_config(args.config, args.override)
    try:
        token.parse(args.token)
    except token.TokenError as e:
        print(f"garage-node join: {e}", file=sys.stderr)
        return 2
    paths = identity.StatePaths(cfg.node.state_dir)
    current = identity.load(paths)
    if current is not None and not current.revoked:
        print(f"garage-node join: this PC already belongs to a region as node {current.node_id} ({current.api_url}).\n"
              f"To move it to another head: stop the agent, remove {paths.identity}, then join again.", file=sys.stderr)
        return 2
    write_private(paths.join_token, args.token.strip().encode() + b"\n")
    try:
        with client(cfg.socket_path, timeout=2) as c:
            c.post("/v1/reconcile")
        print("Token stored; the agent is joining now. Watch it with: garage-node status")
    except Exception:
        print("Token stored. The agent is not running: start it with `systemctl start garage-node`.")
    return 0


def _cmd_drain(args) -> int:
    return _set_drain(args, True)


def _cmd_resume(args) -> int:
    return _set_drain(args, False)


def _set_drain(args, on: bool) -> int:
    from . import identity
    from .localapi import client

    cfg = load_node_config(args.config, args.override)
    flag = identity.StatePaths(cfg.node.state_dir).drain_flag
    # A file, not only a request to the agent: the drain holds across agent restarts and reboots.
    if on:
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text("drained by garage-node drain\n")
    else:
        flag.unlink(missing_ok=True)
    try:
        with client(cfg.socket_path, timeout=2) as c:
            c.post("/v1/reconcile")
        running = True
    except Exception:
        running = False
    what = "Draining: running requests finish, then the engine stops." if on else "Resumed: the engine starts again."
    print(what + (" Watch it with: garage-node status" if running else " (The agent is not running; it applies this when it starts.)"))
    return 0


def _cmd_plan(args) -> int:
    from . import engine, gpu, planner

    cfg = load_node_config(args.config, args.override)
    inv = gpu.read_inventory()
    try:
        catalog = planner.load_catalog(engine.catalog_path(cfg.engine))
        plan = engine.plan_for(cfg.engine, inv, catalog)
    except (planner.PlanError, planner.CatalogError, OSError) as e:
        print(f"garage-node plan: {e}", file=sys.stderr)
        return 1
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.explain())
    return 0


# ---------------------------------------------------------------- head


def _cmd_head_init(args) -> int:
    from . import head

    cfg = load_head_config(args.config)
    for line in head.init(cfg):
        print(line)
    return 0


def _cmd_head_run(args) -> int:
    from . import head

    cfg = load_head_config(args.config)
    try:
        head.run(cfg)
    except head.HeadError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


def _cmd_head_token(args) -> int:
    from . import head

    cfg = load_head_config(args.config)
    if args.uses is not None and args.uses < 1:
        print("garage-node head token: --uses must be 1 or more", file=sys.stderr)
        return 2
    try:
        tok = head.create_token(cfg, args.ttl, args.uses)
    except head.HeadError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    # The token alone on stdout, so scripts can capture it; the rest on stderr.
    print(tok.encode())
    uses = "unlimited uses" if args.uses is None else f"{args.uses} use{'s' if args.uses > 1 else ''}"
    ttl = args.ttl or cfg.options.default_token_ttl_s
    print(f"token {tok.token_id}: {uses}, expires in {ttl / 3600:.1f} h", file=sys.stderr)
    return 0


def _cmd_head_nodes(args) -> int:
    from . import head
    from .headview import node_rows, render_nodes

    cfg = load_head_config(args.config)
    rows = node_rows(head.registry(cfg), cfg.options.offline_after_s)
    print(json.dumps(rows, indent=2) if args.json else render_nodes(rows))
    return 0


def _cmd_head_revoke(args) -> int:
    from . import head

    cfg = load_head_config(args.config)
    reg = head.registry(cfg)
    try:
        node = reg.find_node(args.node)
    except KeyError:
        print(f"garage-node head revoke: no node '{args.node}' (see `garage-node head nodes`)", file=sys.stderr)
        return 2
    except LookupError as e:
        print(f"garage-node head revoke: {e}", file=sys.stderr)
        return 2
    reg.revoke(node.id)
    print(f"revoked {node.id} ({node.name}, {node.overlay_ip}); its peer leaves the hub within "
          f"{cfg.options.peer_sync_s:.0f} s")
    return 0


# ---------------------------------------------------------------- demo


def _cmd_demo(args) -> int:
    from .testbed.demo import run_demo

    return run_demo(keep=args.keep)


# ---------------------------------------------------------------- helpers


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration; use e.g. 90s, 30m, 24h or 7d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def _setup_logging(verbose: bool) -> None:
    # Under systemd the journal adds its own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
