"""The operator's rollout commands (`garage-node head rollout start|pause|resume|abort|status`),
as functions over the rollout's file, the stored releases and the registry's last reports, so
the CLI stays a thin printer and the tests drive the very same calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from garage_node.core.wire import UpdateStatus, WireError, decode
from garage_node.head.registry import NodeRow
from garage_node.head.releases import ReleaseStore
from garage_node.head.rollout import (ENDED, MemberState, Rollout, RolloutError, RolloutPlan, eligible,
                                      failed_before)
from garage_node.head.rolloutstore import RolloutStore


def update_facts(report: Any) -> UpdateStatus | None:
    """The update facts of a registry row's last report (None: an older agent, or none)."""
    if not isinstance(report, dict) or not isinstance(report.get("update"), dict):
        return None
    try:
        return decode(report["update"], UpdateStatus)
    except WireError:
        return None


def start(store: RolloutStore, releases: ReleaseStore, nodes: Iterable[NodeRow], plan: RolloutPlan, now: float,
          offline_after_s: float) -> Rollout:
    """Start a rollout of a stored release over the PCs that can take it now (online, an A/B
    stick of the release's variant, not on it, owner allows, not blocked). PCs offline now join
    the last wave when they come back."""
    release = releases.release(plan.version)
    if release is None:
        raise RolloutError(f"the head holds no release {plan.version}: add it first with "
                           "`garage-node head release add DIR` (see `head release list`)")
    plan = RolloutPlan(**{**plan.__dict__, "variant": release.variant})
    current = store.current()
    if current is not None and current.state not in ENDED:
        raise RolloutError(f"the rollout of {current.plan.version} is {current.state}: abort it first "
                           "(`garage-node head rollout abort`)")
    blocked = store.blocked()
    ids, stale = [], set()
    for n in nodes:
        facts = update_facts(n.report)
        online = n.last_seen is not None and now - n.last_seen <= offline_after_s
        if not n.revoked and online and facts is not None and eligible(n.id, facts, plan, blocked):
            ids.append(n.id)
            if failed_before(facts, plan.version):
                stale.add(n.id)
    return store.create(Rollout.start(plan, ids, now, blocked, stale))


def command(store: RolloutStore, action: str, now: float) -> Rollout:
    """pause, resume or abort the newest rollout; retried if the head wrote it meanwhile."""
    for _ in range(10):
        r = store.current()
        if r is None:
            raise RolloutError("there is no rollout: start one with `garage-node head rollout start VERSION`")
        read = r.state
        {"pause": r.pause, "resume": r.resume, "abort": r.abort}[action](now)
        if store.save(r, read):
            return r
    raise RolloutError("the rollout kept changing under this command: try again")


@dataclass(frozen=True)
class WaveRow:
    wave: int
    name: str
    size: int
    counts: dict[str, int]
    open: bool


def waves(r: Rollout) -> list[WaveRow]:
    rows = []
    for i, size in enumerate(r.wave_sizes):
        name = f"canary ({r.plan.canary})" if i == 0 else f"{r.plan.waves[i - 1]:g} %"
        rows.append(WaveRow(i, name, size, r.counts(i), i < r.open_waves))
    return rows


def summary(r: Rollout) -> dict[str, Any]:
    """`head rollout status --json`."""
    return {
        "id": r.id, "version": r.plan.version, "variant": r.plan.variant, "state": r.state.value, "reason": r.reason,
        "started_at": r.started_at, "updated_at": r.updated_at, "touched": r.touched(),
        "plan": {"canary": r.plan.canary, "waves": list(r.plan.waves), "max_failures_pct": r.plan.max_failures_pct,
                 "start_timeout_s": r.plan.start_timeout_s, "update_timeout_s": r.plan.update_timeout_s},
        "counts": r.counts(),
        "waves": [{"wave": w.wave, "name": w.name, "size": w.size, "open": w.open, **w.counts} for w in waves(r)],
        "failed": [{"node_id": m.node_id, "wave": m.wave, "why": m.why}
                   for m in sorted(r.members.values(), key=lambda m: (m.wave, m.node_id))
                   if m.state == MemberState.FAILED][:50],
    }

