"""The node's one state and one line for a person, derived from facts in one place.

A pure function: the agent gathers the facts on each pass, `derive` says what they add up to,
and tests can hold every combination against it without a network, a Ray or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from garage_node.core.wire import NodeState


@dataclass(frozen=True)
class Facts:
    joined: bool  # has an identity (enrolled once)
    revoked: bool
    # Before the first join, what the enrollment step last said (needs a token, enrolling, error).
    enrollment: tuple[NodeState, str] | None
    version_mismatch: str | None
    overlay_ready: bool
    head_reachable: bool | None
    ray_running: bool
    ray_alive_at_head: bool
    overlay_ip: str | None
    healthy_gpus: int
    stopping: bool = False
    overlay_down: bool = False  # the interface is up but the hub does not answer through it
    # Why the PC does not serve now though it could: outside serving hours, a hot GPU.
    paused: str | None = None
    gpu_notes: tuple[str, ...] = ()  # quarantined or hot GPUs, in a few words each
    ray_note: str | None = None  # why the Ray worker is not alive at the head yet, if known
    # The head's audits quarantined this PC (head/audit/trust.py): (state, why) as the head's
    # last answer said; state "quarantined" or "rechecking".
    quarantine: tuple[str, str] | None = None


def derive(f: Facts) -> tuple[NodeState, str]:
    if f.stopping:
        return NodeState.STOPPING, "stopping: draining the engine, then Ray worker and overlay go down; identity kept"
    if not f.joined:
        return f.enrollment or (NodeState.STARTING, "starting")
    if f.revoked:
        if f.enrollment and f.enrollment[0] is NodeState.ENROLLING:
            return f.enrollment
        return NodeState.REVOKED, "revoked by the operator: needs a new join token"
    if f.version_mismatch:
        return NodeState.DEGRADED, f"version mismatch, Ray worker not started: {f.version_mismatch}"
    if not f.overlay_ready:
        return NodeState.JOINING, "bringing up the overlay"
    if f.head_reachable is False:
        return NodeState.DEGRADED, "head unreachable; retrying"
    if f.overlay_down:
        return NodeState.DEGRADED, "overlay down: the hub does not answer through WireGuard; Ray cannot work"
    if f.quarantine:
        # Above the Ray and pause states: whatever else holds, the region sends it nothing, and
        # its owner must act (or wait for the re-check the operator started).
        state, why = f.quarantine
        if state == "rechecking":
            return NodeState.QUARANTINED, f"being re-checked by the region's audits on test requests: {why}"
        return NodeState.QUARANTINED, (f"quarantined by the region's audits: {why}; no requests or Ray work, "
                                       "earnings frozen until the operator releases it")
    if f.ray_alive_at_head and f.ray_running:
        # Paused only once fully joined: a PC outside its hours still shows that it is part of
        # the region and would serve, and any problem above outranks the owner's pause.
        if f.paused:
            # A quarantined GPU outlasts the pause, so it is said too (heat is in `paused`).
            out = "".join(f"; {n}" for n in f.gpu_notes if "quarantined" in n)
            return NodeState.PAUSED, f.paused + out
        offer = f"{f.healthy_gpus} GPU{'s' if f.healthy_gpus != 1 else ''}" if f.healthy_gpus else "CPU only"
        # A quarantined GPU leaves the node serving on the others: joined, and it says so.
        notes = "".join(f"; {n}" for n in f.gpu_notes)
        return NodeState.JOINED, f"joined as {f.overlay_ip}; Ray worker alive at the head ({offer}{notes})"
    why = f" ({f.ray_note})" if f.ray_note else ""
    return NodeState.JOINING, ("Ray worker starting" if f.ray_running else "Ray worker waiting to restart") + why
