"""`garage-node head ...`: the regional head's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from garage_node.cli import headfed
from garage_node.cli import headmodel
from garage_node.cli import headrelease
from garage_node.cli import headrollout
from garage_node.cli import headaudit
from garage_node.cli import headtrust
from garage_node.cli import headweights
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
    key = cmd("key", key_cmd, "API keys for the region's OpenAI-compatible gateway: `key create NAME` prints a new "
              "key once (only its hash is kept), `key list`, `key revoke NAME`")
    key.add_argument("action", choices=["create", "list", "revoke"])
    key.add_argument("name", nargs="?", help="the key's name (create, revoke): whom or what it is for")
    key.add_argument("--models", help="comma-separated models the key may use (default: every model)")
    key.add_argument("--rpm", type=int, help="requests per minute it may send")
    key.add_argument("--tpm", type=int, help="tokens (prompt + completion) per minute it may use")
    key.add_argument("--quota", type=int, help="tokens it may use in all")
    key.add_argument("--ttl", type=duration, help="lifetime, e.g. 30d (default: until revoked)")
    key.add_argument("--json", action="store_true", help="list as JSON")
    usage = cmd("usage", usage_cmd, "tokens served through the gateway, from the usage ledger")
    usage.add_argument("--by", choices=["key", "node", "model", "region"], default="key",
                       help="group by (default: key; region: with --global)")
    usage.add_argument("--global", dest="global_", action="store_true",
                       help="every region's usage (federation), by key, region, PC or model")
    usage.add_argument("--since", type=duration, help="only the last period, e.g. 24h or 7d (to the hour; default: ever)")
    usage.add_argument("--json", action="store_true")
    cmd("fleet-key", fleet_key, "make the fleet page's admin key (shown once, stored hashed); a new one replaces "
        "the old and signs out everyone who used it")
    headmodel.add_command(cmd)  # `head model ...`: the region's catalog (cli/headmodel.py)
    headweights.add_command(cmd)  # `head weights ...`: the model store (cli/headweights.py)
    headrelease.add_command(cmd)  # `head release ...`: signed OS releases (cli/headrelease.py)
    headrollout.add_command(cmd, duration)  # `head rollout ...`: releases across the region (cli/headrollout.py)
    headtrust.add_command(cmd)  # `head node ...`: a PC's trust and quarantine (cli/headtrust.py)
    headaudit.add_command(cmd)  # `head audit ...`: the audits' status and calibration (cli/headaudit.py)
    headfed.add_command(cmd)  # `head federation ...`: regions together (cli/headfed.py)


def init(args) -> int:
    from garage_node.head import setup

    for line in setup.init(load_head_config(args.config)):
        print(line)
    return 0


def run(args) -> int:
    from garage_node.head import service
    from garage_node.head.setup import SetupError

    cfg = load_head_config(args.config)
    try:
        service.run(cfg)
    except SetupError as e:
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
    except setup.SetupError as e:
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
    from garage_node.head.audit.trust import Trust
    from garage_node.head.fleet import node_rows, render_nodes, with_tokens, with_trust
    from garage_node.head.gateway.ledger import Ledger

    cfg = load_head_config(args.config)
    rows = node_rows(setup.open_registry(cfg), cfg.options.offline_after_s)
    store = _gateway_store(cfg)
    if store is None:
        return EX_UNAVAILABLE
    rows = with_trust(with_tokens(rows, Ledger(store).node_totals_all()), Trust(store).all())
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
    except setup.SetupError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    print("Ray cluster token rotated: the running head restarts its Ray head within "
          f"{cfg.options.peer_sync_s:.0f} s; nodes restart their Ray workers after their next heartbeat.")
    return 0


def fleet_key(args) -> int:
    import ipaddress

    from garage_node.head.fleetpage.auth import key_file, make_key

    cfg = load_head_config(args.config)
    key = make_key(cfg.head.state_dir)
    # The key alone on stdout (scripts capture it); where it works on stderr.
    print(key)
    f = cfg.fleet
    ip = ipaddress.ip_address(f.listen_host)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    where = f"{'http' if ip.is_loopback else 'https'}://{host}:{f.port}/"
    print(f"fleet page admin key made (only its hash is kept, in {key_file(cfg.head.state_dir)}); it opens {where}"
          + ("" if f.needs_key else " once [fleet] asks for it (listen_host off loopback, or require_key = true)"),
          file=sys.stderr)
    return 0


def _gateway_store(cfg):
    """The gateway's database, or None after saying why (the head is not initialised)."""
    from garage_node.head import setup
    from garage_node.head.gateway.gateway import database_path
    from garage_node.head.gateway.store import Store

    try:
        setup.require_init(cfg)
    except setup.SetupError as e:
        print(f"garage-node head: {e}", file=sys.stderr)
        return None
    return Store(database_path(cfg.head.state_dir))


def key_cmd(args) -> int:
    import time

    from garage_node.head.gateway.keys import KeyError_, KeyStore

    cfg = load_head_config(args.config)
    store = _gateway_store(cfg)
    if store is None:
        return EX_UNAVAILABLE
    keys = KeyStore(store)
    if args.action in ("create", "revoke") and not args.name:
        print(f"garage-node head key {args.action}: name the key, e.g. `garage-node head key {args.action} alice`",
              file=sys.stderr)
        return 2
    now = time.time()
    try:
        if args.action == "create":
            models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
            record, secret = keys.create(args.name, now, models=models, rpm=args.rpm, tpm=args.tpm,
                                         quota_tokens=args.quota, ttl_s=args.ttl)
            print(secret)  # alone on stdout, for scripts; shown this once
            print(f"key '{record.name}' made: {_key_terms(record)}. It is shown only now; keep it safe "
                  f"(`garage-node head key revoke {record.name}` ends it).", file=sys.stderr)
        elif args.action == "revoke":
            record = keys.revoke(args.name, now)
            print(f"key '{record.name}' revoked: the gateway refuses it from its next request")
        else:
            records = keys.all()
            if args.json:
                print(json.dumps([{"name": k.name, "hint": k.hint, "state": k.state(now), "models": list(k.models),
                                   "rpm": k.rpm, "tpm": k.tpm, "quota_tokens": k.quota_tokens,
                                   "created_at": k.created_at, "expires_at": k.expires_at, "revoked_at": k.revoked_at}
                                  for k in records], indent=2))
            else:
                print(f"{'NAME':<20} {'KEY':<12} {'STATE':<8} TERMS")
                for k in records:
                    print(f"{k.name:<20} {k.hint + '…':<12} {k.state(now):<8} {_key_terms(k)}")
    except KeyError_ as e:
        print(f"garage-node head key {args.action}: {e}", file=sys.stderr)
        return 2
    return 0


def _key_terms(k) -> str:
    import time

    terms = [f"models {', '.join(k.models)}" if k.models else "every model"]
    terms += [f"{v} {unit}" for v, unit in ((k.rpm, "requests/min"), (k.tpm, "tokens/min"), (k.quota_tokens, "tokens in all"))
              if v is not None]
    if k.expires_at is not None:
        terms.append("expires " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(k.expires_at)))
    return ", ".join(terms)


def usage_cmd(args) -> int:
    import time

    from garage_node.head import setup
    from garage_node.head.gateway.ledger import Ledger

    if args.global_:
        return headfed.usage_global(args)
    if args.by == "region":
        print("garage-node head usage: --by region needs --global (a region's own ledger is all one region)",
              file=sys.stderr)
        return 2
    cfg = load_head_config(args.config)
    store = _gateway_store(cfg)
    if store is None:
        return EX_UNAVAILABLE
    ledger = Ledger(store)
    since = time.time() - args.since if args.since else 0.0
    rows = ledger.usage(args.by, since=since)
    names = {n.id: n.name for n in setup.open_registry(cfg).nodes()} if args.by == "node" else {}
    earnings = _earnings(cfg, store, ledger, since) if args.by == "node" else {}
    if args.json:
        print(json.dumps([{args.by: r.group, **({"name": names.get(r.group)} if args.by == "node" else {}),
                           "requests": r.requests, "prompt_tokens": r.prompt_tokens,
                           "completion_tokens": r.completion_tokens, "total_tokens": r.total_tokens,
                           **_earned_fields(earnings, r.group, args.by)} for r in rows],
                         indent=2))
        return 0
    if not rows:
        print("no usage recorded" + (" in that period" if args.since else " yet"))
        return 0
    label = {"node": "PC"}.get(args.by, args.by.upper())
    paid = f" {'EARNED':>10} {'HELD':>10} {'FROZEN':>10} {'FORFEITED':>10}" if args.by == "node" else ""
    print(f"{label:<28} {'REQUESTS':>9} {'PROMPT':>10} {'COMPLETION':>11} {'TOTAL':>10}{paid}")
    for r in rows:
        group = f"{names[r.group]} ({r.group})" if r.group in names else r.group
        e = _earned_fields(earnings, r.group, args.by)
        paid = "".join(f" {v:>10}" for v in e.values())
        print(f"{group:<28} {r.requests:>9} {r.prompt_tokens:>10} {r.completion_tokens:>11} {r.total_tokens:>10}{paid}")
    if args.by == "node":
        print(f"earned: credited more than {cfg.audit.hold_days:g} days ago ([audit] hold_days) and not frozen; "
              "held: since; frozen: not yet earned when the audits quarantined the PC (`garage-node head node`). "
              "By the hour: the ledger's rows are hourly.")
    return 0


def _earnings(cfg, store, ledger, since: float) -> dict:
    """node id -> its Earnings (head/gateway/ledger.py), as `head usage --by node` shows them."""
    from garage_node.head.audit.trust import Trust

    return ledger.earnings(Trust(store).all(), cfg.audit.hold_days * 86400, since=since)


def _earned_fields(earnings: dict, node_id: str, by: str) -> dict[str, int]:
    if by != "node":
        return {}
    e = earnings.get(node_id)
    return {f"{k}_tokens": getattr(e, k) if e is not None else 0 for k in ("earned", "held", "frozen", "forfeited")}


def duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration; use e.g. 90s, 30m, 24h or 7d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value
