"""`garage-node head node ACTION NODE`: what the operator decides about a PC's trust (issue #20).
The commands write the gateway's database (head/audit/trust.py); the running head reads it
within a second (the trust store's cached view), so its gateway, heartbeat answers and
firewall follow without a restart.

    trust NODE       mark a PC trusted: its engine may verify the others' answers
    untrust NODE     take the mark back
    quarantine NODE  take a PC out by hand (--why says why, for its owner)
    release NODE     end a quarantine: the head re-checks the PC on canary requests, then
                     lets it serve (or quarantines it again); --without-recheck: at once
    forfeit NODE     keep what a quarantined PC had not yet earned (its frozen tokens)
    show NODE        its trust, state and earnings
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the head's modules are imported when the command runs, not by every CLI start
    from garage_node.head.audit.trust import NodeTrust, Trust
    from garage_node.head.gateway.ledger import Earnings, Ledger

EX_UNAVAILABLE = 69
ACTIONS = ("trust", "untrust", "quarantine", "release", "forfeit", "show")

HELP = ("a PC's trust (the region's audits): `node trust NODE` makes its engine a verifier, "
        "`node untrust NODE`, `node quarantine NODE --why TEXT` takes it out by hand, `node release NODE` "
        "re-checks a quarantined PC on canaries and lets it serve again, `node forfeit NODE` keeps its "
        "frozen earnings, `node show NODE`")


class TrustError(ValueError):
    """The operator asked for something that cannot be done; the text says what to do instead."""


def add_command(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Registered by cli/head.py with its `cmd` (which adds --config and --verbose)."""
    sp = cmd("node", run, HELP)
    sp.add_argument("action", choices=ACTIONS)
    sp.add_argument("node", help="node id or name (see `garage-node head nodes`)")
    sp.add_argument("--why", default="", help="quarantine: why, in words its owner reads on `garage-node status`")
    sp.add_argument("--without-recheck", action="store_true",
                    help="release: let it serve at once, without the re-check on canaries (a quarantine "
                         "found to be wrong, or no verifier to re-check with)")
    sp.add_argument("--json", action="store_true", help="show: as JSON")


def run(args: argparse.Namespace) -> int:
    from garage_node.cli.head import _gateway_store
    from garage_node.head import setup
    from garage_node.head.audit.trust import Trust
    from garage_node.head.config import load_head_config
    from garage_node.head.gateway.ledger import Ledger

    cfg = load_head_config(args.config)
    store = _gateway_store(cfg)
    if store is None:
        return EX_UNAVAILABLE
    try:
        node = setup.open_registry(cfg).find_node(args.node)
    except KeyError:
        print(f"garage-node head node {args.action}: no node '{args.node}' (see `garage-node head nodes`)",
              file=sys.stderr)
        return 2
    except LookupError as e:
        print(f"garage-node head node {args.action}: {e}", file=sys.stderr)
        return 2
    trust, ledger = Trust(store), Ledger(store)
    hold_s = cfg.audit.hold_days * 86400
    if args.action == "show" and args.json:
        t = trust.get(node.id)
        print(json.dumps({"node_id": node.id, "name": node.name, "trust": asdict(t),
                          "earnings": asdict(_earnings(ledger, t, hold_s))}, indent=2))
        return 0
    try:
        text = act(trust, ledger, hold_s, args.action, node.id, why=args.why, recheck=not args.without_recheck)
    except TrustError as e:
        print(f"garage-node head node {args.action}: {e}", file=sys.stderr)
        return 2
    print(f"{node.name} ({node.id}): {text}")
    return 0


def act(trust: Trust, ledger: Ledger, hold_s: float, action: str, node_id: str, why: str = "",
        recheck: bool = True) -> str:
    """Carry out one operator action on a PC known to the registry; what was done, in words.
    Raises TrustError when the PC's state does not allow it."""
    current = trust.get(node_id)
    if action == "trust":
        if not current.serves:
            raise TrustError(f"{node_id} is {current.state}: a PC the audits took out cannot verify others "
                             f"(release it first: `garage-node head node release {node_id}`)")
        if current.trusted:
            return "already trusted"
        trust.set_trusted(node_id, True)
        return "trusted: its engine may verify the other PCs' audited answers"
    if action == "untrust":
        if not current.trusted:
            return "was not marked trusted; nothing changed"
        trust.set_trusted(node_id, False)
        return "no longer trusted: its engine verifies nothing"
    if action == "quarantine":
        if current.state == "quarantined":
            raise TrustError(f"{node_id} is already quarantined ({current.why or 'no reason given'})")
        trust.quarantine(node_id, why or "quarantined by the region's operator")
        return ("quarantined: no customers' requests and no Ray work from now (within a second), its held "
                "earnings frozen; its owner sees why on `garage-node status`")
    if action == "release":
        if current.state == "ok":
            raise TrustError(f"{node_id} is not quarantined: there is nothing to release")
        if not recheck:
            trust.release(node_id)
            return "released without a re-check: it serves again, and its frozen earnings are held again"
        if current.state == "rechecking":
            raise TrustError(f"{node_id} is being re-checked already; `garage-node head node show {node_id}` says "
                             "how it ends (or release it at once with --without-recheck)")
        trust.start_recheck(node_id)
        return ("re-check started: the head sends it canary requests, scores them, and lets it serve again if "
                f"they pass (or quarantines it again); `garage-node head node show {node_id}` says which")
    if action == "forfeit":
        if current.frozen_at is not None and current.frozen_at in current.forfeits:
            raise TrustError(f"{node_id}'s frozen earnings are forfeited already")
        if current.frozen_at is None:
            raise TrustError(f"{node_id} has nothing frozen to forfeit: only a quarantined PC's earnings are "
                             "frozen (`garage-node head node quarantine` takes a PC out by hand)")
        tokens = _earnings(ledger, current, hold_s).frozen
        trust.forfeit(node_id)
        return (f"forfeited: the {tokens} tokens it had not yet earned when it was quarantined are not paid "
                "(what it earned before stays earned)")
    if action == "show":
        e = _earnings(ledger, current, hold_s)
        return describe(current) + f"; tokens: {e.earned} earned, {e.held} held, {e.frozen} frozen, {e.forfeited} forfeited"
    raise TrustError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")


def _earnings(ledger: Ledger, t: NodeTrust, hold_s: float) -> Earnings:
    """One PC's earnings (none credited yet: all 0)."""
    from garage_node.head.gateway.ledger import Earnings

    return ledger.earnings({t.node_id: t}, hold_s).get(t.node_id, Earnings(t.node_id))


def describe(t: NodeTrust) -> str:
    """A PC's trust in a few words (`node show`, `head nodes`)."""
    since = time.strftime(" since %Y-%m-%d %H:%M UTC", time.gmtime(t.since)) if t.since else ""
    words = {"ok": "serving", "quarantined": f"QUARANTINED{since}: {t.why}",
             "rechecking": f"being re-checked on canaries{since} (quarantined: {t.why})"}[t.state]
    return ("trusted verifier, " if t.trusted else "") + words
