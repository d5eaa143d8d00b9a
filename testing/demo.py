"""`scripts/demo` (`python -m testing.demo`): a region on this machine, a head and two gaming PCs, joined for real.

The hosts are network namespaces; the programs are the real ones (head, agents, wireguard-go,
Ray). Only the GPUs are simulated, through the NVML test double. Everything is removed at the end.
"""

from __future__ import annotations

import signal
import sys
import time

from testing.nvml_double import RTX_4060, RTX_4090, RTX_3060_12GB
from testing.region import Testbed, TestbedError, missing_prerequisite


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(keep: bool = False) -> int:
    if why := missing_prerequisite():
        say(f"demo: {why}. Run it as root: ./scripts/demo")
        return 2
    start = time.monotonic()
    with Testbed() as tb:
        say(f"Region '{tb.prefix}': namespaces on a private bridge; work files in {tb.dir}")
        head = tb.start_head()
        say(f"  head      {head.ip}  control API https://{head.ip}:8443, WireGuard hub 100.96.0.1, Ray head")
        nodes = [tb.add_node("alice-pc", [RTX_4090, RTX_4060]), tb.add_node("bob-pc", [RTX_3060_12GB])]
        for node in nodes:
            # Each PC gets what its USB stick would carry: a name and a single-use join token.
            node.configure(head.token("--uses", "1", "--ttl", "10m"))
            node.start()
            say(f"  node      {node.ip}  {node.name}: agent started with a single-use token ({len(node.gpus)} simulated GPU)")
        say("Waiting for both PCs to enroll, bring up WireGuard and join Ray ...")
        try:
            for node in nodes:
                node.wait_state("joined", 180)
                say(f"  {node.name} joined after {time.monotonic() - start:.0f} s")
        except (TimeoutError, TestbedError) as e:
            say(f"demo failed: {e}")
            return 1
        say("\n$ garage-node head nodes")
        say(head.cli("head", "nodes", "--config", str(head.config)).stdout.rstrip())
        for node in nodes:
            say(f"\n$ garage-node status   (on {node.name})")
            say(node.run(node.cmd("status")).stdout.rstrip())
        peer = nodes[1].status()["overlay"]["address"]
        ping = nodes[0].run(["ping", "-c", "1", "-W", "3", peer], check=False)
        say(f"\n{nodes[0].name} -> {nodes[1].name} over the overlay ({peer}): {'ok' if ping.returncode == 0 else 'FAILED'}")
        if keep:
            say("\nRunning until Ctrl-C; namespaces: " + ", ".join(h.ns for h in tb.hosts))
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        say("\nCleaning up (agents, head, namespaces) ...")
    say(f"Done in {time.monotonic() - start:.0f} s.")
    return 0


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="scripts/demo", description=(
        "A regional head and two gaming PCs on this machine, each in its own network namespace, running "
        "the real garage-node, wireguard-go and Ray with simulated GPUs; prints the region's status and "
        "cleans up. Needs root."))
    p.add_argument("--keep", action="store_true", help="leave it running until Ctrl-C")
    args = p.parse_args(argv)
    return run_demo(keep=args.keep)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
