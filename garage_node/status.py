"""`garage-node status`: the agent's status document, read from its local API and rendered
for a person at a glance; or, with the agent down, what can be read locally."""

from __future__ import annotations

import time
from typing import Any

import httpx

from . import gpu, identity, localapi
from .config import NodeConfig
from .identity import StatePaths
from .wireguard import Interface

STATE_WORDS = {
    "joined": "joined",
    "joining": "joining",
    "enrolling": "enrolling",
    "needs-token": "waiting for a join token",
    "degraded": "degraded",
    "revoked": "revoked",
    "error": "error",
    "starting": "starting",
    "stopping": "stopping",
    "agent-down": "agent not running",
}


def fetch(cfg: NodeConfig) -> tuple[dict[str, Any], bool]:
    """(status document, agent_running)."""
    try:
        with localapi.client(cfg.socket_path) as c:
            resp = c.get("/v1/status")
            resp.raise_for_status()
            return resp.json(), True
    except (httpx.HTTPError, OSError) as e:
        return offline_snapshot(cfg, f"cannot reach the agent at {cfg.socket_path} ({_short(e)})"), False


def offline_snapshot(cfg: NodeConfig, why: str) -> dict[str, Any]:
    """What status can still tell with the agent down: identity, GPUs, interface."""
    inv = gpu.read_inventory()
    try:
        ident = identity.load(StatePaths(cfg.node.state_dir))
    except (OSError, ValueError):
        ident = None
    iface = Interface(cfg.overlay.interface)
    up = iface.exists()
    return {
        "state": "agent-down",
        "message": why,
        "node_id": ident.node_id if ident else None,
        "name": ident.name if ident else cfg.node.name or None,
        "region": ident.region if ident else None,
        "gpus": [g.__dict__ for g in inv.gpus],
        "gpu_note": inv.nvml_error,
        "driver_version": inv.driver_version,
        "cuda_version": inv.cuda_version,
        "overlay": {"interface": iface.name, "up": up, "address": iface.address() if up else (ident.overlay_ip if ident else None),
                    "hub_ip": ident.hub_ip if ident else None, "hub_endpoint": ident.hub_endpoint if ident else None,
                    "handshake_age_s": None},
        "head": {"api_url": ident.api_url if ident else None, "reachable": None, "last_contact_age_s": None, "error": None},
        "ray": {"state": "unknown", "address": ident.ray_address if ident else None, "alive_at_head": None,
                "pid": None, "restarts": None, "last_exit_code": None, "resources": None},
        "engine": {"state": "unknown", "message": "the agent is not running", "draining": StatePaths(cfg.node.state_dir).drain_flag.exists()},
        "versions": None,
        "last_error": {"message": why, "hint": "start the agent: systemctl start garage-node (logs: journalctl -u garage-node)", "age_s": 0},
        "agent": None,
    }


def render(s: dict[str, Any]) -> str:
    lines = [f"garage-node  {s.get('name') or '?'}" + (f" ({s['node_id']})" if s.get("node_id") else "")
             + (f"  region {s['region']}" if s.get("region") else "")]
    add = lambda label, text: lines.append(f"{label:<11}{text}")  # noqa: E731
    add("State:", f"{_dot(s['state'])} {STATE_WORDS.get(s['state'], s['state'])}: {s['message']}")
    _gpus(s, add, lines)
    add("Overlay:", _overlay(s["overlay"]))
    add("Head:", _head(s["head"]))
    add("Ray:", _ray(s["ray"]))
    for i, text in enumerate(_engine(s["engine"])):
        add("Engine:" if i == 0 else "", text)
    err = s.get("last_error")
    if err:
        retry = f" (retrying in {err['retry_in_s']:.0f} s)" if err.get("retry_in_s") is not None else ""
        add("Problem:", err["message"] + retry)
        if err.get("hint"):
            add("  To fix:", err["hint"])
    else:
        add("Problem:", "none")
    return "\n".join(lines)


def _dot(state: str) -> str:
    return {"joined": "●", "revoked": "✗", "error": "✗", "agent-down": "✗", "degraded": "!"}.get(state, "○")


def _gpus(s: dict[str, Any], add, lines: list[str]) -> None:
    gpus = s.get("gpus") or []
    if not gpus:
        add("GPUs:", f"none — CPU node ({s.get('gpu_note') or 'no NVIDIA GPU found'})")
        return
    driver = f"driver {s.get('driver_version')}, CUDA {s.get('cuda_version')}"
    for i, g in enumerate(gpus):
        if g["healthy"]:
            extra = "  ".join(x for x in (
                f"{g['temperature_c']}°C" if g.get("temperature_c") is not None else "",
                f"{g['power_w']:.0f} W" if g.get("power_w") is not None else "",
                f"{g['utilization_pct']}% busy" if g.get("utilization_pct") is not None else "") if x)
            text = f"{g['index']}  {g['name']}  {g['memory_total_mib'] / 1024:.1f} GiB  {extra}  ok"
        else:
            text = f"{g['index']}  {g['name']}  UNHEALTHY: {g.get('error')}"
        add("GPUs:" if i == 0 else "", text)
    lines.append(f"{'':<11}{driver}")


def _overlay(o: dict[str, Any]) -> str:
    if not o.get("address"):
        return f"not joined ({o['interface']} {'up' if o['up'] else 'down'})"
    hs = o.get("handshake_age_s")
    handshake = f"handshake {_age(hs)} ago" if hs is not None else "no handshake yet"
    state = "up" if o["up"] else "DOWN"
    return f"{o['address']} on {o['interface']} ({state}), hub {o.get('hub_ip')} via {o.get('hub_endpoint')}, {handshake}"


def _head(h: dict[str, Any]) -> str:
    if not h.get("api_url"):
        return "none yet"
    if h.get("reachable") is None:
        return f"{h['api_url']} (not contacted yet)"
    if h["reachable"]:
        return f"{h['api_url']} reachable, last contact {_age(h.get('last_contact_age_s'))} ago"
    return f"{h['api_url']} UNREACHABLE: {h.get('error')}"


def _ray(r: dict[str, Any]) -> str:
    if not r.get("address"):
        return "not started (not joined yet)"
    res = r.get("resources") or {}
    text = {
        "alive": f"worker alive at the Ray head {r['address']}",
        "starting": f"worker started, not yet listed by the Ray head {r['address']}",
        "backoff": f"worker exited (code {r.get('last_exit_code')}); restarting with backoff",
        "version-mismatch": "not started: Ray/Python versions differ from the head's (see Problem)",
        "stopped": "stopped",
        "unknown": "unknown (agent not running)",
    }.get(r["state"], r["state"])
    if res:
        text += f"; offers {res.get('GPU', 0)} GPU, {res.get('vram_mib', 0)} MiB VRAM"
    if r.get("restarts"):
        text += f"; {r['restarts']} restarts"
    return text


def _engine(e: dict[str, Any]) -> list[str]:
    lines = [f"{e['state']}: {e.get('message') or ''}".rstrip(": ")]
    if e.get("state") == "healthy":
        since = f", healthy for {_age(time.time() - e['healthy_since'])}" if e.get("healthy_since") else ""
        load = ""
        if e.get("requests_running") is not None:
            tps = e.get("generation_tokens_per_s")
            load = f"; {e['requests_running']} running, {e['requests_waiting']} waiting" + (f", {tps:.1f} tokens/s" if tps is not None else "")
        lines.append(f"{e.get('image')}{since}{load}")
    if e.get("restarts"):
        lines.append(f"{e['restarts']} restarts")
    if e.get("draining") and e.get("state") != "draining":
        lines.append("drained by the owner: `garage-node resume` to serve again")
    if e.get("state") in ("degraded", "restarting") and e.get("last_log_lines"):
        lines.append("last engine log lines:")
        lines += [f"  {line[:150]}" for line in e["last_log_lines"][-8:]]
    return lines


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _short(e: BaseException) -> str:
    return (str(e) or type(e).__name__).splitlines()[0][:160]
