"""`scripts/demo` (`python -m testing.demo`): a region on this machine, a head and two gaming
PCs, joined for real, each serving a model that answers a request sent to the head.

The hosts are network namespaces; the programs are the real ones (head, agents, wireguard-go,
Ray, and per PC a dockerd running the vLLM CPU image with a tiny model). Only the GPUs are
simulated, through the NVML test double, so the engines run on the CPU. Everything is removed
at the end. `--no-engine`: the join only (about a minute).
"""

from __future__ import annotations

import json
import signal
import sys
import time

from testing.dockerd import TINY_MODEL, engine_toml, tiny_model_dir
from testing.nvml_double import RTX_4060, RTX_4090, RTX_3060_12GB
from testing.region import HeadHost, NodeHost, Testbed, TestbedError, missing_prerequisite


def say(text: str) -> None:
    print(text, flush=True)


def wait_engines(nodes, start: float, timeout: float = 900) -> None:
    """Until every PC's engine is healthy, with a line whenever one's state changes."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {n.name: n.status()["engine"]["state"] for n in nodes}
        for name, state in states.items():
            if seen.get(name) != state:
                say(f"  {name} engine: {state} ({time.monotonic() - start:.0f} s)")
        seen = states
        if all(v == "healthy" for v in states.values()):
            return
        time.sleep(2)
    raise TimeoutError("the engines did not become healthy in time; see each PC's `garage-node status`")


def ask(head, key: str, prompt: str, max_tokens: int = 12) -> tuple[str, str, dict]:
    """A chat completion sent to the head's gateway: (the PC that answered, the text, usage)."""
    body = json.dumps({"model": TINY_MODEL, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens})
    res = head.run(["curl", "-s", "-D", "-", "--max-time", "120", "-H", "Content-Type: application/json",
                    "-H", f"Authorization: Bearer {key}", "-d", body, "http://127.0.0.1:8080/v1/chat/completions"],
                   timeout=130)
    headers, _, text = res.stdout.replace("\r\n", "\n").partition("\n\n")
    pc = next((line.split(":", 1)[1].strip() for line in headers.splitlines()
               if line.lower().startswith("x-garage-node:")), "?")
    reply = json.loads(text)
    if "error" in reply:
        raise TestbedError(f"the gateway refused: {reply['error']['message']}")
    return pc, reply["choices"][0]["message"]["content"], reply["usage"]


def start_region(tb: Testbed, engine: bool, start: float) -> tuple[HeadHost, list[NodeHost]]:
    """The demo's region in `tb`: a head, and two PCs (alice-pc with two simulated GPUs, bob-pc
    with one) started with single-use tokens and joined (WireGuard, Ray); with `engine`, each
    PC has a dockerd of its own and an engine on a CPU of its own (not yet healthy: see
    wait_engines). Says what it does; raises TimeoutError or TestbedError."""
    say(f"Region '{tb.prefix}': namespaces on a private bridge; work files in {tb.dir}")
    head = tb.start_head()
    say(f"  head      {head.ip}  control API https://{head.ip}:8443, WireGuard hub 100.96.0.1, Ray head")
    nodes: list[NodeHost]
    if engine:
        say("Starting each PC's own dockerd (the vLLM CPU image is loaded into it the first time: a minute or two) ...")
        model = tiny_model_dir()
        # Each PC's engine on a CPU of its own, as on separate machines (testing/dockerd.py).
        nodes = [tb.add_engine_node("alice-pc", engine_toml(model, cpus="0"), [RTX_4090, RTX_4060]),
                 tb.add_engine_node("bob-pc", engine_toml(model, cpus="1"), [RTX_3060_12GB])]
    else:
        nodes = [tb.add_node("alice-pc", [RTX_4090, RTX_4060]), tb.add_node("bob-pc", [RTX_3060_12GB])]
    for node in nodes:
        # Each PC gets what its USB stick would carry: a name and a single-use join token.
        node.configure(head.token("--uses", "1", "--ttl", "10m"))
        node.start()
        say(f"  node      {node.ip}  {node.name}: agent started with a single-use token ({len(node.gpus)} simulated GPU)")
    say("Waiting for both PCs to enroll, bring up WireGuard and join Ray ...")
    for node in nodes:
        node.wait_state("joined", 180)
        say(f"  {node.name} joined after {time.monotonic() - start:.0f} s")
    return head, nodes


def run_demo(keep: bool = False, engine: bool = True) -> int:
    if why := missing_prerequisite():
        say(f"demo: {why}. Run it as root: ./scripts/demo")
        return 2
    start = time.monotonic()
    with Testbed() as tb:
        try:
            head, nodes = start_region(tb, engine, start)
        except (TimeoutError, TestbedError) as e:
            say(f"demo failed: {e}")
            return 1
        if engine:
            say("Waiting for each PC's engine (vLLM on the CPU, a tiny model; a few minutes on a small machine) ...")
            try:
                wait_engines(nodes, start)
                key = head.cli("head", "key", "create", "demo", "--config", str(head.config)).stdout.strip()
                say("\n$ garage-node head key create demo      (an API key for the region's gateway)")
                for prompt in ("Hello! Who answers me?", "Tell me about gaming PCs.", "And again?"):
                    pc, text, usage = ask(head, key, prompt)
                    say(f"\nPOST http://{head.ip}:8080/v1/chat/completions  \"{prompt}\"\n"
                        f"  answered by {pc}: {text!r}  ({usage['prompt_tokens']} prompt + "
                        f"{usage['completion_tokens']} completion tokens)")
                time.sleep(1.5)  # the usage ledger writes every second
                say("\n$ garage-node head usage --by node")
                say(head.cli("head", "usage", "--by", "node", "--config", str(head.config)).stdout.rstrip())
                time.sleep(3)  # the PCs hear their totals with their next heartbeat
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
        "the real garage-node, wireguard-go, Ray and (per PC) a vLLM CPU engine in Docker with simulated GPUs; "
        "sends a chat completion to the head's gateway and shows which PC answered and the usage; prints the "
        "region's status and cleans up. Needs root."))
    p.add_argument("--keep", action="store_true", help="leave it running until Ctrl-C")
    p.add_argument("--no-engine", action="store_true",
                   help="join only: no engines, no gateway request (quicker, no Docker needed)")
    args = p.parse_args(argv)
    return run_demo(keep=args.keep, engine=not args.no_engine)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
