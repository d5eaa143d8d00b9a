"""`ray start` for a node whose Python starts slowly: `python -m garage_node.node.raystart start ...`
takes the same arguments as `ray start` and runs Ray's own CLI, with two adjustments.

Why: the raylet waits a fixed ~20 s (a constant in Ray 2.60's raylet, not a setting) for its
Python agents to announce their ports in files, and aborts when they are late; `ray start` then
fails with "timed out during startup". Each agent must first import Ray, which takes under a
second on a gaming PC but 9 s on an emulated PC (QEMU without KVM, our boot test) and more on a
loaded or cold one, with three such imports at once. So:

- the runtime-env agent gets its port from us (`--runtime-env-agent-port`): the raylet then
  uses that port and does not wait for an announcement;
- on a minimal Ray install, which is what garage-node ships (no dashboard extras), the
  dashboard agent serves none of its three ports and announces -1 for each once it has
  imported Ray. We write those same -1 announcements before the raylet starts, with Ray's own
  `persist_port`, so the raylet does not wait for them. With the dashboard extras installed
  the agent serves real ports and nothing is written ahead.

Everything else is Ray's code path. The hooks are Ray internals of the pinned version; the unit
tests check that they still exist, so a Ray upgrade that moves them fails loudly.
"""

from __future__ import annotations

import os
import socket
import sys

# The raylet's client of the runtime-env agent gives up on it after agent_register_timeout_ms
# (30 s by default; unlike the port-file wait, a Ray setting read from the environment). With
# the agent's port given ahead, that client may start before the agent listens: allow 5 min.
AGENT_REGISTER_TIMEOUT_MS = "300000"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def with_runtime_env_agent_port(argv: list[str]) -> list[str]:
    if any(a.startswith("--runtime-env-agent-port") for a in argv):
        return argv
    return [*argv, "--runtime-env-agent-port", str(free_port())]


def announce_minimal_dashboard_ports() -> None:
    """Before the raylet starts, write the -1 port files a minimal dashboard agent writes."""
    import ray._private.node as node_module
    import ray._private.utils as ray_utils
    from ray._raylet import (DASHBOARD_AGENT_LISTEN_PORT_NAME, METRICS_AGENT_PORT_NAME,
                             METRICS_EXPORT_PORT_NAME, persist_port)

    if ray_utils.get_dashboard_dependency_error() is None:
        return  # full dashboard agent: it serves these ports, so it must announce them itself
    start_raylet = node_module.Node.start_raylet

    def start_raylet_announced(self, *args, **kwargs):
        for name in (METRICS_AGENT_PORT_NAME, METRICS_EXPORT_PORT_NAME, DASHBOARD_AGENT_LISTEN_PORT_NAME):
            persist_port(self._session_dir, self._node_id, name, -1)
        return start_raylet(self, *args, **kwargs)

    node_module.Node.start_raylet = start_raylet_announced


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["start"] and "--head" not in args:
        args = with_runtime_env_agent_port(args)
        announce_minimal_dashboard_ports()
    os.environ.setdefault("RAY_agent_register_timeout_ms", AGENT_REGISTER_TIMEOUT_MS)
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *args]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main())
