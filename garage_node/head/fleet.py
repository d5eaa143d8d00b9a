"""The fleet as the operator reads it: one typed row per node, for `garage-node head nodes`
(table or JSON) and, later, the web view.

A row never fails because of what a node reported: a report that no longer decodes (an older
or misbehaving node) leaves its fields empty and says so in `report_error`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from garage_node.core.wire import NodeReport, UpdateOutcome, UpdateStatus, WireError, decode
from garage_node.head.registry import NodeRow, Registry


@dataclass(frozen=True)
class GpuRow:
    name: str
    memory_total_mib: int
    healthy: bool
    temperature_c: int | None = None
    quarantined: bool = False  # out until the node's agent restarts; `error` says why
    hot: bool = False  # above the owner's max_temp_c
    error: str | None = None
    power_limit_w: float | None = None


@dataclass(frozen=True)
class EngineRow:
    state: str | None
    model: str | None
    endpoint: str | None
    draining: bool | None


@dataclass(frozen=True)
class NodeVersions:
    agent: str | None
    ray: str | None
    python: str | None


@dataclass(frozen=True)
class FleetRow:
    node_id: str
    name: str
    region: str
    overlay_ip: str
    status: str  # online, offline, revoked
    node_state: str | None
    last_seen_age_s: float | None
    ray_alive: bool
    ray_checked_at: float | None  # when the Ray head last said so (never before the Ray head started)
    gpus: list[GpuRow]
    engine: EngineRow
    versions: NodeVersions | None
    enrolled_at: float
    revoked_at: float | None
    report_error: str | None = None
    paused: str | None = None  # why the PC does not serve now: the owner's hours, heat
    tokens_served_today: int = 0  # through the gateway (its usage ledger), since 00:00 UTC
    tokens_served_total: int = 0
    os_version: str | None = None  # the stick's booted OS version (an A/B stick; issue #19)
    update_note: str | None = None  # an update under way, waiting (why), or rolled back
    # The region's audits (head/audit/trust.py): "ok", "quarantined" or "rechecking", and why.
    trust_state: str = "ok"
    quarantine_why: str | None = None
    trusted: bool = False  # the operator's mark: its engine verifies the others


def node_rows(reg: Registry, offline_after_s: float, now: float | None = None) -> list[FleetRow]:
    now = time.time() if now is None else now
    return [row_of(n, now, offline_after_s) for n in reg.nodes()]


def row_of(n: NodeRow, now: float, offline_after_s: float) -> FleetRow:
    if n.revoked:
        status = "revoked"
    elif n.last_seen is None or now - n.last_seen > offline_after_s:
        status = "offline"
    else:
        status = "online"
    report, error = _report(n)
    e = report.engine if report else None
    return FleetRow(
        node_id=n.id, name=n.name, region=n.region, overlay_ip=n.overlay_ip, status=status,
        node_state=report.state.value if report else None,
        last_seen_age_s=round(now - n.last_seen, 1) if n.last_seen else None,
        ray_alive=n.ray_alive, ray_checked_at=n.ray_checked_at,
        gpus=[GpuRow(g.name, g.memory_total_mib, g.healthy, g.temperature_c, g.quarantined, g.hot, g.error,
                     g.power_limit_w) for g in report.gpus] if report else [],
        engine=EngineRow(e.state.value if e else None, e.model if e else None, e.endpoint if e else None,
                         e.draining if e else None),
        versions=NodeVersions(report.versions.agent, report.versions.ray, report.versions.python) if report else None,
        enrolled_at=n.enrolled_at, revoked_at=n.revoked_at, report_error=error,
        paused=report.serving.paused if report and report.serving else None,
        os_version=report.update.os_version if report and report.update else None,
        update_note=update_note(report.update) if report and report.update else None,
    )


def update_note(u: UpdateStatus) -> str | None:
    """The PC's update in a few words for `head nodes`: rolled back, under way, or waiting."""
    if u.last_outcome == UpdateOutcome.ROLLED_BACK and u.last_version:
        return f"rolled back from {u.last_version}" + (f": {u.last_why}" if u.last_why else "")
    if u.last_outcome == UpdateOutcome.FAILED and u.last_version:
        return f"update to {u.last_version} failed" + (f": {u.last_why}" if u.last_why else "")
    if u.last_outcome == UpdateOutcome.INSTALLING and u.last_version:
        return f"updating to {u.last_version}"
    if u.target and u.target != u.os_version:
        return f"update to {u.target} waits" + (f": {u.pending_why}" if u.pending_why else "")
    return None


def _report(n: NodeRow) -> tuple[NodeReport | None, str | None]:
    if not n.report:
        return None, None
    try:
        return decode(n.report, NodeReport), None
    except WireError as e:
        return None, f"the node's last report could not be read: {e}"


def render_nodes(rows: list[FleetRow]) -> str:
    if not rows:
        return "No nodes yet. Make a join token with `garage-node head token create`."
    out = [f"{'NODE':<13}{'NAME':<16}{'OVERLAY IP':<15}{'STATUS':<9}{'RAY':<6}{'SEEN':<7}{'OS':<13}{'ENGINE':<30}"
           f"{'TOKENS':>8}  GPUS"]
    for r in rows:
        gpus = ", ".join(f"{g.name} {g.memory_total_mib / 1024:.0f}G{_gpu_flag(g)}" for g in r.gpus) or "CPU only"
        seen = f"{r.last_seen_age_s:.0f}s" if r.last_seen_age_s is not None else "-"
        e = r.engine
        engine = f"{e.state} {e.model or ''}".strip() if e.state else "-"
        out.append(f"{r.node_id:<13}{r.name[:15]:<16}{r.overlay_ip:<15}{r.status:<9}"
                   f"{'alive' if r.ray_alive else '-':<6}{seen:<7}{(r.os_version or '-')[:12]:<13}{engine[:29]:<30}"
                   f"{_count(r.tokens_served_total):>8}  {gpus}"
                   + (f"  paused: {r.paused}" if r.paused else "") + _trust_note(r)
                   + (f"  {r.update_note}" if r.update_note else ""))
    return "\n".join(out)


def _trust_note(r: FleetRow) -> str:
    if r.trust_state == "quarantined":
        return f"  QUARANTINED: {r.quarantine_why}"
    if r.trust_state == "rechecking":
        return f"  re-checking (quarantined: {r.quarantine_why})"
    return "  trusted verifier" if r.trusted else ""


def with_trust(rows: list[FleetRow], trust: dict) -> list[FleetRow]:
    """The rows with each PC's trust (`trust`: node id -> head/audit/trust.NodeTrust)."""
    from dataclasses import replace

    return [replace(r, trust_state=t.state, quarantine_why=t.why if not t.serves else None, trusted=t.trusted)
            if (t := trust.get(r.node_id)) is not None else r for r in rows]


def _count(n: int) -> str:
    """1234567 -> "1.2M": tokens at a glance."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def with_tokens(rows: list[FleetRow], totals: dict) -> list[FleetRow]:
    """The rows with each PC's tokens served (`totals`: node id -> ledger Totals)."""
    from dataclasses import replace

    return [replace(r, tokens_served_today=totals[r.node_id].today, tokens_served_total=totals[r.node_id].total)
            if r.node_id in totals else r for r in rows]


def _gpu_flag(g: GpuRow) -> str:
    if g.quarantined:
        return " (quarantined)"
    if not g.healthy:
        return " (bad)"
    return f" (hot {g.temperature_c}°C)" if g.hot else ""
