"""`garage-node status`: the agent's status document, read through its local API and rendered
for a person at a glance; or, with the agent down, what can be read locally."""

from __future__ import annotations

import time

from garage_node import __version__
from garage_node.core.raycmd import local_versions
from garage_node.core.wire import (AgentVersions, EngineState, EngineStatus, HeadStatus, NodeState, OverlayStatus, ProblemStatus,
                                   RayState, RayStatus, ServingStatus, Status, WireError)
from garage_node.core.wireguard import Interface
from garage_node.node import gpu, identity
from garage_node.node.config import NodeConfig
from garage_node.node.localapi import AgentClient, AgentDown
from garage_node.node.paths import StatePaths

STATE_WORDS = {
    NodeState.NEEDS_TOKEN: "waiting for a join token",
    NodeState.AGENT_DOWN: "agent not running",
}


def fetch(cfg: NodeConfig) -> tuple[Status, bool]:
    """(status document, agent_running)."""
    try:
        with AgentClient(cfg.socket_path) as c:
            return c.status(), True
    except (AgentDown, WireError) as e:
        return offline_status(cfg, str(e)), False


def offline_status(cfg: NodeConfig, why: str) -> Status:
    """What status can still tell with the agent down: identity, GPUs, interface. Every key
    of the document is there, null where only the agent would know."""
    inv = gpu.read_inventory()
    paths = StatePaths(cfg.node.state_dir)
    try:
        ident = identity.load(paths)
    except (OSError, ValueError, TypeError):
        ident = None
    iface = Interface(cfg.overlay.interface)
    up = iface.exists()
    local = local_versions()
    return Status(
        state=NodeState.AGENT_DOWN,
        message=why,
        node_id=ident.node_id if ident else None,
        name=ident.name if ident else cfg.node.name or None,
        region=ident.region if ident else None,
        gpus=list(inv.gpus),
        gpu_note=inv.nvml_error,
        driver_version=inv.driver_version,
        cuda_version=inv.cuda_version,
        overlay=OverlayStatus(interface=iface.name, up=up,
                              address=iface.address() if up else (ident.overlay_ip if ident else None),
                              hub_ip=ident.hub_ip if ident else None,
                              hub_endpoint=ident.hub_endpoint if ident else None),
        head=HeadStatus(api_url=ident.api_url if ident else None),
        ray=RayStatus(state=RayState.UNKNOWN, address=ident.ray_address if ident else None),
        engine=EngineStatus(state=EngineState.UNKNOWN, message="the agent is not running",
                            draining=paths.drain_flag.exists()),
        # The status command is the same installation as the agent: its versions are the agent's.
        versions=AgentVersions(agent=__version__, ray=local.ray, python=local.python),
        last_error=ProblemStatus(message=why, age_s=0.0,
                                 hint="start the agent: systemctl start garage-node (logs: journalctl -u garage-node)"),
        agent=None,
        serving=_configured_serving(cfg),
    )


def _configured_serving(cfg: NodeConfig) -> ServingStatus:
    """The owner's settings, as far as they are known without the agent (not whether it serves)."""
    g, windows = cfg.gpu, cfg.schedule.windows
    zone = cfg.schedule.timezone or "the PC's time zone"
    return ServingStatus(serving=None, schedule=f"{', '.join(windows)} ({zone})" if windows else "always",
                         max_temp_c=g.max_temp_c or None, resume_temp_c=g.resume_below_c if g.max_temp_c else None,
                         power_limit_w=g.power_limit_w or None)


def render(s: Status) -> str:
    lines = [f"garage-node  {s.name or '?'}" + (f" ({s.node_id})" if s.node_id else "")
             + (f"  region {s.region}" if s.region else "")]

    def add(label: str, text: str) -> None:
        lines.append(f"{label:<11}{text}")

    add("State:", f"{_dot(s.state)} {STATE_WORDS.get(s.state, s.state.value)}: {s.message}")
    for label, text in quarantine_lines(s):
        add(label, text)
    _gpus(s, add, lines)
    if s.serving is not None:
        for i, text in enumerate(_serving(s)):
            add("Serving:" if i == 0 else "", text)
    add("Overlay:", _overlay(s.overlay))
    add("Head:", _head(s.head))
    add("Ray:", _ray(s.ray))
    for i, text in enumerate(_engine(s.engine, switching=bool(s.placement and s.placement.switching_to))):
        add("Engine:" if i == 0 else "", text)
    for i, text in enumerate(placement_lines(s)):
        add("Model:" if i == 0 else "", text)
    for i, text in enumerate(update_lines(s)):
        add("OS:" if i == 0 else "", text)
    if s.tokens_served is not None:
        add("Served:", f"{_tokens(s.tokens_served.today)} tokens today, {_tokens(s.tokens_served.total)} in all "
                       "(through the region's gateway)")
        if (paid := earnings_line(s.tokens_served, _tokens)) is not None:
            add("", paid)
    # Every problem, worst first; an older agent's status has only last_error.
    problems = s.problems or ([s.last_error] if s.last_error else [])
    for err in problems:
        retry = f" (retrying in {err.retry_in_s:.0f} s)" if err.retry_in_s is not None else ""
        add("Problem:", err.message + retry)
        if err.hint:
            add("  To fix:", err.hint)
    if not problems:
        add("Problem:", "none")
    return "\n".join(lines)


def _dot(state: NodeState) -> str:
    return {NodeState.JOINED: "●", NodeState.REVOKED: "✗", NodeState.ERROR: "✗", NodeState.AGENT_DOWN: "✗",
            NodeState.DEGRADED: "!", NodeState.PAUSED: "‖", NodeState.QUARANTINED: "✗"}.get(state, "○")


def earnings_line(served, count) -> str | None:
    """Of the tokens served, what is earned, held and frozen (a head with audits says; None
    from one without). `count` writes a number."""
    if getattr(served, "earned", None) is None:
        return None
    text = f"{count(served.earned)} earned, {count(served.held or 0)} held until the region's audits trust them"
    return text + (f", {count(served.frozen)} frozen by the quarantine" if served.frozen else "")


def update_lines(s: Status) -> list[str]:
    """The stick's OS version and its update, if the PC booted a versioned stick (issue #19)."""
    u = getattr(s, "update", None)  # absent from older agents
    if u is None:
        return []
    lines = [f"{u.os_version or '?'}" + (f" ({u.variant})" if u.variant else "")
             + (f", other slot {u.other_version}" if u.other_version else "")
             + ("" if u.blessed is not False else f", not yet confirmed good ({u.tries_left} tries left)")
             + f"; updates: {u.policy}"]
    if u.target and u.target != u.os_version:
        lines.append(f"the head wants {u.target}" + (f": {u.pending_why}" if u.pending_why else ""))
    if u.last_version and u.last_outcome is not None:
        lines.append(f"last update to {u.last_version}: {u.last_outcome.value}"
                     + (f" ({u.last_why})" if u.last_why else ""))
    return lines


def quarantine_lines(s: Status) -> list[tuple[str, str]]:
    """(label, text) about the region's audits' quarantine, for `status` and the screen: what
    they found, since when, and what the owner can do. None of it while the PC is not quarantined."""
    q = getattr(s, "quarantine", None)  # absent from older agents
    if q is None:
        return []
    since = time.strftime(" since %Y-%m-%d %H:%M UTC", time.gmtime(q.since)) if q.since else ""
    word = "re-check" if q.state == "rechecking" else "QUARANTINED"
    out = [("Audits:", f"{word}{since}: {q.why}")]
    if q.hint:
        out.append(("  To do:", q.hint))
    return out


def _gpus(s: Status, add, lines: list[str]) -> None:
    if not s.gpus:
        add("GPUs:", f"none — CPU node ({s.gpu_note or 'no NVIDIA GPU found'})")
        return
    for i, g in enumerate(s.gpus):
        if g.healthy:
            extra = "  ".join(x for x in (
                f"{g.temperature_c}°C" if g.temperature_c is not None else "",
                f"{g.power_w:.0f} W" if g.power_w is not None else "",
                f"{g.utilization_pct}% busy" if g.utilization_pct is not None else "",
                f"limit {g.power_limit_w:.0f} W" if g.power_limit_w is not None else "") if x)
            health = "TOO HOT: engine paused until it cools" if g.hot else "ok"
            text = f"{g.index}  {g.name}  {g.memory_total_mib / 1024:.1f} GiB  {extra}  {health}"
        else:
            text = f"{g.index}  {g.name}  UNHEALTHY: {g.error}"
        add("GPUs:" if i == 0 else "", text)
    lines.append(f"{'':<11}driver {s.driver_version}, CUDA {s.cuda_version}")


def _serving(s: Status) -> list[str]:
    v = s.serving
    assert v is not None
    first = {True: "yes", None: "unknown (agent not running)"}.get(v.serving, f"PAUSED: {v.paused}")
    if v.schedule and v.schedule != "always":
        first += f"; hours {v.schedule}"
    lines = [first]
    limits = []
    if v.max_temp_c:
        limits.append(f"max {v.max_temp_c}°C, back below {v.resume_temp_c}°C")
    if v.power_limit_w:
        limits.append(f"power limit {v.power_limit_w} W")
    if limits:
        lines.append("; ".join(limits))
    if v.power_note:
        lines.append(v.power_note)
    return lines


def _overlay(o: OverlayStatus) -> str:
    if not o.address:
        return f"not joined ({o.interface} {'up' if o.up else 'down'})"
    handshake = f"handshake {_age(o.handshake_age_s)} ago" if o.handshake_age_s is not None else "no handshake yet"
    state = "up" if o.up else "DOWN"
    return f"{o.address} on {o.interface} ({state}), hub {o.hub_ip} via {o.hub_endpoint}, {handshake}"


def _head(h: HeadStatus) -> str:
    if not h.api_url:
        return "none yet"
    if h.reachable is None:
        return f"{h.api_url} (not contacted yet)"
    if h.reachable:
        return f"{h.api_url} reachable, last contact {_age(h.last_contact_age_s)} ago"
    return f"{h.api_url} UNREACHABLE: {h.error}"


_RAY_WORDS = {
    RayState.BACKOFF: "worker exited (code {code}); restarting with backoff",
    RayState.VERSION_MISMATCH: "not started: Ray/Python versions differ from the head's (see Problem)",
    RayState.STOPPED: "stopped",
    RayState.UNKNOWN: "unknown (agent not running)",
}


def _ray(r: RayStatus) -> str:
    if not r.address:
        return "not started (not joined yet)"
    if r.state is RayState.ALIVE:
        text = f"worker alive at the Ray head {r.address}"
    elif r.state is RayState.STARTING:
        text = f"worker started, not yet listed by the Ray head {r.address}"
    else:
        text = _RAY_WORDS[r.state].format(code=r.last_exit_code)
    if r.resources:
        text += f"; offers {r.resources.GPU} GPU, {r.resources.vram_mib} MiB VRAM"
    if r.restarts:
        text += f"; {r.restarts} restarts"
    return text


def placement_lines(s: Status) -> list[str]:
    """Who decides what this PC serves, and where a switch the head asked for stands (#18)."""
    a, p = s.assignment, s.placement
    if p is None:
        return []
    if p.switching_to:
        lines = [f"switching to {p.switching_to} ({_switch_words(s, p.fetch_pct)})"]
    elif a is None:
        return ["chosen by this PC (the head assigns nothing: no model in its region catalog, placement off, or an older head)"]
    elif p.assignment_generation < a.generation and p.refused_generation == a.generation:
        lines = [f"the head assigns {a.model or 'nothing'} (generation {a.generation}); not carried out, refused: "
                 f"{p.refused_why or 'see Problem'}",
                 "serves what it served before until the head reassigns it (the head reads the refusal)"]
    elif p.assignment_generation < a.generation:
        lines = [f"the head assigns {a.model or 'nothing'} (generation {a.generation}); not carried out"
                 " (see Problem)" if any(x.source == "placement" for x in s.problems) else
                 f"the head assigns {a.model or 'nothing'} (generation {a.generation}); taking it over"]
    elif a.model is None:
        lines = ["serving nothing, as the head assigned"]
    else:
        lines = [f"serving {a.model}, assigned by the head"]
    if a is not None and a.reason:
        lines.append(f"why: {a.reason}")
    return lines


def _switch_words(s: Status, fetch_pct: float | None) -> str:
    """Where a switch stands: downloading, waiting to retry a failed download (the old engine
    serves undisturbed, not reported as draining), or draining and starting."""
    if fetch_pct is not None:
        return f"downloading {fetch_pct:.0f} %"
    if not s.engine.draining:
        failed = next((x for x in s.problems if x.source == "placement"), None)
        if failed is not None:
            again = f"; tried again in {failed.retry_in_s:.0f} s" if failed.retry_in_s is not None else ""
            return f"the download of its weights failed, see Problem{again}; the old engine serves meanwhile"
        return "waiting for its weights; the old engine serves meanwhile"
    return "draining the old engine, starting the new one"


def _engine(e: EngineStatus, switching: bool = False) -> list[str]:
    lines = [f"{e.state.value}: {e.message or ''}".rstrip(": ")]
    if e.state is EngineState.HEALTHY:
        since = f", healthy for {_age(time.time() - e.healthy_since)}" if e.healthy_since else ""
        load = ""
        if e.requests_running is not None:
            tps = e.generation_tokens_per_s
            load = f"; {e.requests_running} running, {e.requests_waiting} waiting" + (f", {tps:.1f} tokens/s" if tps is not None else "")
        lines.append(f"{e.image}{since}{load}")
    if e.restarts:
        lines.append(f"{e.restarts} restarts")
    if e.draining and e.state is not EngineState.DRAINING and not switching:
        lines.append("drained by the owner: `garage-node resume` to serve again")
    if e.state in (EngineState.DEGRADED, EngineState.RESTARTING) and e.last_log_lines:
        lines.append("last engine log lines:")
        lines += [f"  {line[:150]}" for line in e.last_log_lines[-8:]]
    return lines


def _tokens(n: int) -> str:
    for unit, size in ((" G", 1e9), (" M", 1e6), (" k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
