"""`garage-node head nodes`: the registry as an operator reads it (table or JSON)."""

from __future__ import annotations

import time
from typing import Any

from .registry import NodeRow, Registry


def node_rows(reg: Registry, offline_after_s: float) -> list[dict[str, Any]]:
    now = time.time()
    return [_row(n, now, offline_after_s) for n in reg.nodes()]


def _row(n: NodeRow, now: float, offline_after_s: float) -> dict[str, Any]:
    if n.revoked:
        status = "revoked"
    elif n.last_seen is None or now - n.last_seen > offline_after_s:
        status = "offline"
    else:
        status = "online"
    gpus = n.report.get("gpus") or []
    engine = n.report.get("engine") or {}
    return {
        "node_id": n.id,
        "name": n.name,
        "region": n.region,
        "overlay_ip": n.overlay_ip,
        "status": status,
        "node_state": n.report.get("state"),
        "last_seen_age_s": round(now - n.last_seen, 1) if n.last_seen else None,
        "ray_alive": n.ray_alive,
        "gpus": [{"name": g["name"], "memory_total_mib": g["memory_total_mib"], "healthy": g["healthy"]} for g in gpus],
        "engine": {k: engine.get(k) for k in ("state", "model", "endpoint", "draining")},
        "versions": n.report.get("versions"),
        "enrolled_at": n.enrolled_at,
        "revoked_at": n.revoked_at,
    }


def render_nodes(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No nodes yet. Make a join token with `garage-node head token create`."
    out = [f"{'NODE':<13}{'NAME':<16}{'OVERLAY IP':<15}{'STATUS':<9}{'RAY':<6}{'SEEN':<7}{'ENGINE':<30}GPUS"]
    for r in rows:
        gpus = ", ".join(f"{g['name']} {g['memory_total_mib'] / 1024:.0f}G{'' if g['healthy'] else ' (bad)'}" for g in r["gpus"]) or "CPU only"
        seen = f"{r['last_seen_age_s']:.0f}s" if r["last_seen_age_s"] is not None else "-"
        e = r["engine"]
        engine = f"{e['state']} {e['model'] or ''}".strip() if e.get("state") else "-"
        out.append(f"{r['node_id']:<13}{r['name'][:15]:<16}{r['overlay_ip']:<15}{r['status']:<9}"
                   f"{'alive' if r['ray_alive'] else '-':<6}{seen:<7}{engine[:29]:<30}{gpus}")
    return "\n".join(out)
