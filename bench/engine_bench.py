"""Benchmark: the agent-launched vLLM engine against `docker run` of the same image and
arguments by hand: time to healthy, and completion throughput. Prints figures; asserts nothing.
Goals (issue #3): start <= 1.05x, throughput >= 0.97x.

Run as root with dockerd up and the CPU image built (scripts/test does both):
    .venv/bin/python bench/engine_bench.py [--requests 16] [--concurrency 4] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from testing.region import Testbed, wait_for

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from test_engine import IMAGE, MODEL, engine_section  # noqa: E402  (the very config the tests use)

MANUAL = "garage-bench-manual"


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


def started_at(container: str) -> float:
    text = docker("inspect", "-f", "{{.State.StartedAt}}", container)
    return dt.datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00").timestamp()


def wait_healthy(endpoint: str, timeout: float = 900) -> float:
    """Wall time at which /health answers and /v1/models lists the model (polled every 0.2 s)."""
    def ok() -> bool:
        try:
            if httpx.get(f"{endpoint}/health", timeout=2).status_code != 200:
                return False
            return any(m["id"] == MODEL for m in httpx.get(f"{endpoint}/v1/models", timeout=2).json()["data"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False
    wait_for(ok, timeout, f"{endpoint} healthy", interval=0.2)
    return time.time()


def throughput(endpoint: str, requests: int, concurrency: int, max_tokens: int) -> float:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True}

    def one(_: int) -> int:
        r = httpx.post(f"{endpoint}/v1/completions", json=body, timeout=300)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    one(0)  # warm-up
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens / (time.monotonic() - t0)


def by_hand(spec: dict, host: dict, args: argparse.Namespace) -> tuple[float, float]:
    """The same image, arguments, environment, shm and mounts, with `docker run`."""
    cmd = ["docker", "run", "-d", "--pull", "never", "--name", MANUAL, "--shm-size", str(host["ShmSize"]),
           "-p", "127.0.0.1:18100:8000"]
    for env in spec["Env"]:
        if env.startswith(("VLLM_", "HF_")):
            cmd += ["-e", env]
    for m in host["Mounts"]:
        cmd += ["-v", f"{m['Source']}:{m['Target']}{':ro' if m.get('ReadOnly') else ''}"]
    cmd += [spec["Image"], *spec["Cmd"]]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        healthy_at = wait_healthy("http://127.0.0.1:18100")
        start = healthy_at - started_at(MANUAL)
        return start, throughput("http://127.0.0.1:18100", args.requests, args.concurrency, args.max_tokens)
    finally:
        subprocess.run(["docker", "rm", "-f", MANUAL], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    subprocess.run(["docker", "rm", "-f", "garage-engine", MANUAL], capture_output=True)
    model_dir = Path("/tmp/garage-bench-model")
    subprocess.run([str(ROOT / "image/engine/make-tiny-model.sh"), str(model_dir)], check=True, capture_output=True)
    cache = Path("/tmp/garage-bench-cache")
    cache.mkdir(exist_ok=True)

    agent_starts, agent_totals, agent_tps, manual_starts, manual_tps = [], [], [], [], []
    with Testbed() as tb:
        head = tb.start_head()
        node = tb.add_root_node("eb")
        token = head.token()  # unlimited uses: the node enrolls once, then rejoins without it
        # Both sides run beside the same joined node (agent, Ray worker, head), in turns, so
        # background load falls on both alike.
        for _ in range(args.rounds):
            node.configure(token, engine=engine_section(model_dir, cache))
            t_agent = time.time()
            node.start()
            wait_for(lambda: subprocess.run(["docker", "inspect", "garage-engine"], capture_output=True).returncode == 0,
                     300, "the agent to create its engine")
            endpoint = f"http://{node.wait_state('joined', 120)['overlay']['address']}:8000"
            healthy_at = wait_healthy(endpoint)
            agent_starts.append(healthy_at - started_at("garage-engine"))
            agent_totals.append(healthy_at - t_agent)
            agent_tps.append(throughput(endpoint, args.requests, args.concurrency, args.max_tokens))
            spec = json.loads(docker("inspect", "-f", "{{json .Config}}", "garage-engine"))
            host = json.loads(docker("inspect", "-f", "{{json .HostConfig}}", "garage-engine"))
            node.stop(signal.SIGTERM)  # drains and removes its engine

            node.configure(token, engine="enabled = false\n")
            node.start()
            node.wait_state("joined", 120)
            start, tps = by_hand(spec, host, args)
            manual_starts.append(start)
            manual_tps.append(tps)
            node.stop(signal.SIGTERM)
            print(f"round: agent {agent_starts[-1]:.1f} s, {agent_tps[-1]:.1f} tok/s; "
                  f"by hand {manual_starts[-1]:.1f} s, {manual_tps[-1]:.1f} tok/s", flush=True)

    med = statistics.median
    agent_start, agent_total, manual_start = med(agent_starts), med(agent_totals), med(manual_starts)
    a_tps, m_tps = med(agent_tps), med(manual_tps)
    print("\n== garage-node engine benchmark (vLLM CPU image, tiny dummy-weight Llama) ==")
    print(f"container start -> healthy, agent-launched: {agent_start:.1f} s   (agent start -> healthy: {agent_total:.1f} s)")
    print(f"container start -> healthy, docker run by hand: {manual_start:.1f} s")
    print(f"start ratio agent / by hand: {agent_start / manual_start:.2f}   (goal <= 1.05)")
    print(f"throughput, {args.requests} x {args.max_tokens} tokens, {args.concurrency} at a time: "
          f"agent {a_tps:.1f} tok/s, by hand {m_tps:.1f} tok/s")
    print(f"throughput ratio agent / by hand: {a_tps / m_tps:.2f}   (goal >= 0.97)")
    print(f"(medians of {args.rounds} rounds, agent and by hand in turns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
