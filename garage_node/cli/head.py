"""`garage-node head ...`: the regional head's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from garage_node.core.wire import encode
from garage_node.head.config import load_head_config

EX_UNAVAILABLE = 69

HELP = """\
The regional head that nodes join: `init` once, then `run` under systemd
(garage-head.service); `token create` prints a join token for a PC."""


def add_commands(sub) -> None:
    head = sub.add_parser("head", help="the regional head", description=HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    hsub = head.add_subparsers(required=True, metavar="COMMAND")

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        sp = hsub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", type=Path, help="head config (default /etc/garage-node/head.toml, or $GARAGE_HEAD_CONFIG)")
        sp.add_argument("-v", "--verbose", action="store_true")
        sp.set_defaults(func=func)
        return sp

    cmd("init", init, "create the head's CA, certificate, WireGuard key and registry (safe to repeat)")
    cmd("run", run, "serve the control API, the WireGuard hub and the Ray head")
    tok = cmd("token", token, "create a join token")
    tok.add_argument("action", choices=["create"])
    tok.add_argument("--ttl", type=duration, help="lifetime, e.g. 30m, 24h, 7d (default from config: 24h)")
    tok.add_argument("--uses", type=int, help="how many PCs may join with it (default: unlimited until it expires)")
    nodes_ = cmd("nodes", nodes, "list enrolled nodes")
    nodes_.add_argument("--json", action="store_true")
    rv = cmd("revoke", revoke, "revoke a node: its peer leaves the hub, its heartbeats are refused")
    rv.add_argument("node", help="node id or name")
    rt = cmd("ray-token", ray_token, "rotate the Ray cluster token: the Ray head restarts with the new one, and every "
             "node gets it with its next heartbeat and restarts its Ray worker")
    rt.add_argument("action", choices=["rotate"])


def init(args) -> int:
    from garage_node.head import setup

    for line in setup.init(load_head_config(args.config)):
        print(line)
    return 0


def run(args) -> int:
    from garage_node.head import service
    from garage_node.head.setup import HeadError

    cfg = load_head_config(args.config)
    try:
        service.run(cfg)
    except HeadError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


def token(args) -> int:
    from garage_node.head import setup

    cfg = load_head_config(args.config)
    if args.uses is not None and args.uses < 1:
        print("garage-node head token: --uses must be 1 or more", file=sys.stderr)
        return 2
    try:
        tok = setup.create_token(cfg, args.ttl, args.uses)
    except setup.HeadError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    # The token alone on stdout, so scripts can capture it; the rest on stderr.
    print(tok.encode())
    uses = "unlimited uses" if args.uses is None else f"{args.uses} use{'s' if args.uses > 1 else ''}"
    ttl = args.ttl or cfg.options.default_token_ttl_s
    print(f"token {tok.token_id}: {uses}, expires in {ttl / 3600:.1f} h", file=sys.stderr)
    return 0


def nodes(args) -> int:
    from garage_node.head import setup
    from garage_node.head.fleet import node_rows, render_nodes

    cfg = load_head_config(args.config)
    rows = node_rows(setup.open_registry(cfg), cfg.options.offline_after_s)
    print(json.dumps(encode(rows), indent=2) if args.json else render_nodes(rows))
    return 0


def revoke(args) -> int:
    from garage_node.head import setup

    cfg = load_head_config(args.config)
    reg = setup.open_registry(cfg)
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


def ray_token(args) -> int:
    from garage_node.head import setup

    cfg = load_head_config(args.config)
    try:
        setup.rotate_ray_token(cfg)
    except setup.HeadError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    print("Ray cluster token rotated: the running head restarts its Ray head within "
          f"{cfg.options.peer_sync_s:.0f} s; nodes restart their Ray workers after their next heartbeat.")
    return 0


def duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration; use e.g. 90s, 30m, 24h or 7d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value
