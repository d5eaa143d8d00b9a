"""What the fleet page shows, as JSON-ready dicts: one row per PC (with the problem that puts
it at the top), the region's totals, and one PC's details with its history.

Built from the registry's rows (membership, online/offline/revoked, last seen, the last stored
report) and the history's newest report where that is fresher. Every string a node sent is
passed on as data; the page inserts it as text, never as markup.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from garage_node.core.wire import NodeReport, TokensServed, WireError, decode
from garage_node.head.fleet import row_of, update_note
from garage_node.head.fleetpage.history import History, tokens_per_s
from garage_node.head.registry import NodeRow

log = logging.getLogger(__name__)

HOT_C = 85  # a GPU at or above this is listed as a problem (consumer cards throttle near 90)
ENGINE_PROBLEMS = {"degraded", "refused", "error", "restarting"}

# rank: what sorts first on the page
PROBLEM, OK, REVOKED = 0, 1, 2

# Every PC's tokens served, {node_id: an object with .today and .total} (the gateway's ledger:
# Ledger.node_totals_all, one query for the whole region).
Usage = Callable[[], Mapping[str, Any]]
# The region's models as the head's placement last decided them (head/placement.py's
# PlacementLoop.fleet_models): model, replicas wanted and running, where, demand, why.
Models = Callable[[], list[dict[str, Any]]]
# The audits' verdicts, {node_id: head/audit/trust.py's NodeTrust} (Trust.snapshot: cached).
TrustView = Callable[[], Mapping[str, Any]]
# The region's newest rollout of the stick's OS (head/rolloutops.py summary), None: never one.
RolloutView = Callable[[], dict[str, Any] | None]


def _decode(report: Any) -> NodeReport | None:
    if not report:
        return None
    try:
        return decode(report, NodeReport)
    except WireError:
        return None


def problem_of(status: str, report: NodeReport | None, report_error: str | None) -> str | None:
    """The one line that says what is wrong with a PC, or None."""
    if status == "revoked":
        return None
    if status == "offline":
        return "offline: no heartbeat"
    if report is None:
        return "its last report could not be read" if report_error else "no report yet"
    if report.state.value != "joined":
        # The node's message usually starts with its state already ("degraded: overlay down").
        state = report.state.value
        return report.message if report.message.startswith(state) else f"{state}: {report.message}"
    for g in report.gpus:
        # getattr: `quarantined` and `hot` are newer GPU fields; an older agent does not send them.
        if getattr(g, "quarantined", False):
            return f"GPU {g.index} ({g.name}) quarantined" + (f": {g.error}" if g.error else "")
        if not g.healthy:
            return f"GPU {g.index} ({g.name}) unhealthy" + (f": {g.error}" if g.error else "")
    for g in report.gpus:
        if getattr(g, "hot", False) or (g.temperature_c is not None and g.temperature_c >= HOT_C):
            return f"GPU {g.index} ({g.name}) at {g.temperature_c} °C"
    if report.engine.state.value in ENGINE_PROBLEMS:
        return f"engine {report.engine.state.value}"
    return None


def paused_of(report: NodeReport | None) -> str | None:
    """Why the PC does not serve now by its owner's settings (serving hours, heat): shown, but
    not a problem. None from an agent that does not report it."""
    serving = getattr(report, "serving", None)
    return getattr(serving, "paused", None) if serving is not None else None


def audit_of(t: Any) -> dict[str, Any] | None:
    """A PC's standing with the region's audits, for the page (None: nothing to say)."""
    if t is None or (t.serves and not t.trusted):
        return None
    return {"state": t.state, "why": t.why or None, "since": t.since, "trusted": t.trusted,
            "frozen_at": t.frozen_at, "forfeited": t.forfeited}


def quarantine_problem(t: Any) -> str | None:
    if t is None or t.serves:
        return None
    if t.state == "rechecking":
        return f"re-checked on canaries after a quarantine: {t.why}"
    return f"quarantined by the audits: {t.why}"


def pc_row(n: NodeRow, now: float, offline_after_s: float, history: History,
           served: Any = None, standing: Any = None) -> dict[str, Any]:
    row = row_of(n, now, offline_after_s)
    report = _decode(n.report)
    last_seen = n.last_seen
    latest = history.latest(n.id)
    if latest is not None and (last_seen is None or latest[0] > last_seen):
        last_seen, report = latest
    history.observe(n.id, row.status, n.last_seen, n.revoked_at)
    # A quarantine first: the head decided it, whatever the PC reports (revoked: past caring).
    problem = (row.status != "revoked" and quarantine_problem(standing)) or problem_of(row.status, report, row.report_error)
    gpus = [{"index": g.index, "name": g.name, "memory_total_mib": g.memory_total_mib,
             "temperature_c": g.temperature_c, "power_w": g.power_w, "utilization_pct": g.utilization_pct,
             "healthy": g.healthy, "error": g.error, "quarantined": getattr(g, "quarantined", False),
             "power_limit_w": getattr(g, "power_limit_w", None)} for g in (report.gpus if report else [])]
    temps = [g["temperature_c"] for g in gpus if g["temperature_c"] is not None]
    e = report.engine if report else None
    online = row.status == "online"
    return {
        "id": n.id, "name": n.name, "overlay_ip": n.overlay_ip, "status": row.status,
        "state": report.state.value if report else None,
        "message": report.message if report else (row.report_error or ""),
        "problem": problem,
        "paused": paused_of(report) if online else None,
        "rank": REVOKED if row.status == "revoked" else PROBLEM if problem else OK,
        "last_seen": last_seen, "enrolled_at": n.enrolled_at, "revoked_at": n.revoked_at,
        "ray_alive": n.ray_alive,
        "gpus": gpus, "temp_max_c": max(temps) if temps else None,
        "gpu_note": report.gpu_note if report else None,
        "driver_version": report.driver_version if report else None,
        "cuda_version": report.cuda_version if report else None,
        "versions": {"agent": report.versions.agent, "ray": report.versions.ray,
                     "python": report.versions.python} if report else None,
        "engine": {
            "state": e.state.value, "model": e.model, "endpoint": e.endpoint, "draining": e.draining,
            "healthy_since": e.healthy_since,
            # A PC that is offline serves nothing now, whatever its last report said.
            "requests_running": e.requests_running if online else None,
            "requests_waiting": e.requests_waiting if online else None,
            "tokens_per_s": tokens_per_s(report) if online and report else None,
            "kv_cache_usage_pct": e.kv_cache_usage_pct,
        } if e else None,
        "tokens_served": {"today": served.today, "total": served.total} if served is not None else None,
        "audit": audit_of(standing),
        "os": os_of(report),
    }


def os_of(report: NodeReport | None) -> dict[str, Any] | None:
    """The stick's OS versions and its update (issue #19); None from a PC that is not a stick
    with versions (or an agent too old to say)."""
    u = getattr(report, "update", None)
    if u is None or u.os_version is None:
        return None
    return {"version": u.os_version, "other": u.other_version, "variant": u.variant, "blessed": u.blessed,
            "tries_left": u.tries_left, "policy": u.policy, "target": u.target, "note": update_note(u)}


def rollout_of(r: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the page shows of a rollout: its version, state and why, and each wave's counts."""
    if r is None:
        return None
    return {"version": r["version"], "variant": r["variant"], "state": r["state"], "reason": r["reason"],
            "started_at": r["started_at"], "updated_at": r["updated_at"], "counts": r["counts"], "waves": r["waves"],
            "failed": r["failed"][:10]}


def _sum(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return round(sum(present), 1) if present else None


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    online = [r for r in rows if r["status"] == "online"]
    engines = [r["engine"] for r in online if r["engine"]]
    served = [r["tokens_served"] for r in rows if r["tokens_served"]]
    return {
        "pcs": sum(1 for r in rows if r["status"] != "revoked"),
        "pcs_online": len(online),
        "problems": sum(1 for r in rows if r["rank"] == PROBLEM),
        "paused": sum(1 for r in online if r["paused"]),
        "quarantined": sum(1 for r in rows if r["status"] != "revoked" and r["audit"] and r["audit"]["state"] != "ok"),
        "gpus": sum(len(r["gpus"]) for r in online),
        "gpus_healthy": sum(1 for r in online for g in r["gpus"] if g["healthy"]),
        "models": sorted({e["model"] for e in engines if e["model"] and e["state"] == "healthy"}),
        "tokens_per_s": _sum([e["tokens_per_s"] for e in engines]),
        "requests_running": _sum([e["requests_running"] for e in engines]),
        "requests_waiting": _sum([e["requests_waiting"] for e in engines]),
        "tokens_served_today": sum(s["today"] for s in served) if served else None,
        "tokens_served_total": sum(s["total"] for s in served) if served else None,
    }


def fleet(nodes: list[NodeRow], now: float, offline_after_s: float, history: History,
          usage: Usage | None = None, models: Models | None = None, trust: TrustView | None = None,
          rollout: RolloutView | None = None) -> dict[str, Any]:
    served: Mapping[str, Any] = {}
    nothing_yet = None  # what a PC the ledger has no line for served: unknown without a ledger
    if usage is not None:
        try:
            served = usage()
            nothing_yet = TokensServed(today=0, total=0)
        except Exception:  # the ledger is another part's: the page shows the rest without it
            log.exception("the fleet page could not read the usage ledger")
    standing: Mapping[str, Any] = {}
    if trust is not None:
        try:
            standing = trust()
        except Exception:  # the trust store is the gateway's: the page shows the rest without it
            log.exception("the fleet page could not read the audits' trust store")
    rows = [pc_row(n, now, offline_after_s, history, served.get(n.id, nothing_yet), standing.get(n.id)) for n in nodes]
    history.forget_missing({n.id for n in nodes})
    rows.sort(key=lambda r: (r["rank"], r["name"].lower(), r["id"]))
    placed: list[dict[str, Any]] = []
    if models is not None:
        try:
            placed = models()
        except Exception:  # the placement is another part's: the page shows the rest without it
            log.exception("the fleet page could not read the head's placement")
    current = None
    if rollout is not None:
        try:
            current = rollout_of(rollout())
        except Exception:  # the rollouts are another part's: the page shows the rest without them
            log.exception("the fleet page could not read the rollout")
    return {"now": now, "offline_after_s": offline_after_s, "totals": totals(rows), "pcs": rows, "models": placed,
            "rollout": current}
