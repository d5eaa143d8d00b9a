"""The few places where a head joins its federation, in one module: `head/service.py` calls
`attach` once the gateway exists and `wrap_app` on the gateway's app."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp

from garage_node.head.federation.service import Federation
from garage_node.head.federation.spill import SpillOver


def attach(cfg: Any, gateway: Any) -> Federation | None:
    """The federation for this head (None when [federation] is off), fed by the gateway:
    every usage record (after the ledger's own), and key changes from other regions dropping
    the key from the gateway's cache."""
    f = cfg.federation
    if not f.enabled:
        return None
    fed = Federation(f, cfg.head.region, cfg.head.state_dir, gateway.store, gateway.table, gateway.node_name)
    inner = gateway.proxy.on_usage

    def on_usage(call: Any, usage: Any) -> None:
        inner(call, usage)
        fed.record_usage(call.key.name, usage.node_id, usage.model, usage.prompt_tokens, usage.completion_tokens)

    gateway.proxy.on_usage = on_usage
    fed.on_key_changed = gateway.forget_key
    return fed


def wrap_app(app: ASGIApp, fed: Federation, gateway: Any) -> SpillOver:
    f = fed.cfg
    return SpillOver(app, region=fed.region, secret=fed.secret, table=gateway.table, peers=fed.peers,
                     gateways={r: p.gateway.rstrip("/") for r, p in f.peers.items()},
                     authenticate=gateway.authenticate, budget_ms=f.budget_ms, pc_slots=f.pc_slots,
                     max_body_bytes=gateway.max_body_bytes, ttft=fed.ttft, degraded=lambda: fed.degraded,
                     admit=fed.leases.admit)
