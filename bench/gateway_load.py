"""The head's gateway under a steady rate of short completions, against stand-in engines that
answer at once (so what is measured is the gateway): latency through the gateway against the
same load sent straight to a stand-in, in turns; the gateway process's CPU and RSS.

Three processes on loopback: the stand-in engines (one uvicorn, several ports), the gateway
(the real Gateway and its HTTP app, with an API key and PCs fed in as heartbeats would), and
the load (open loop: requests start on schedule whether or not earlier ones are done).

    .venv/bin/python bench/gateway_load.py [--rate 500] [--seconds 20] [--pcs 8] [--grace 10]
        [--gc freeze|plain] [--gen0 N] [--listener fast|plain] [--max-in-flight N] [--workers N]

`--workers N`: the gateway as `head run` builds it with [gateway] workers = N (the process
and N-1 worker processes on one port, head/gateway/workers.py); CPU, pinning and `--gateway-cpu`
then count and cap each of its processes (each capped at that share of a CPU on its own).

Pinning (printed): where the machine has 3 CPUs or more, the gateway, the stand-ins and the
load each get CPUs of their own; on 2 CPUs the gateway gets one and the stand-ins and the load
share the other; on 1, nothing is pinned. The gateway's garbage-collection pauses (every
collection, timed with gc.callbacks) are printed per turn: count, total and the longest.

Each gateway turn is also printed second by second (by when its requests were due: p99 of what
was served, how many were refused, and the p99 of the load generator's own delay from due to
written), and `--after` says from which second on the gateway was back to normal (every later
second p99 < 10 ms, none refused). Every turn prints how busy the rig's CPUs (the stand-ins' and
the load's) were: a rig that ran out of CPU delays requests that the gateway did not.

Every turn ends `--grace` seconds after its last request is sent at the latest: requests not
answered by then are cancelled (the client leaves) and printed as unfinished, so the bench ends
in bounded time however far behind the target falls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: testing/ is not installed


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free now, below the kernel's ephemeral range: the rig binds them a
    moment later, and a port from the ephemeral range (what binding port 0 gives) could be taken
    meanwhile by one of the load's hundreds of outgoing connections (seed_scale failed to start
    so, "address already in use")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = max(1024, low - 20000)
    start = random.randrange(first, low)  # two rigs at once rarely pick the same
    ports: list[int] = []
    for port in [*range(start, low), *range(first, start)]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise SystemExit(f"fewer than {n} free ports below {low} on 127.0.0.1")


def stub(ports: list[int]) -> None:
    """Engines that answer a completion at once, as vLLM shapes it (any key accepted); on
    httptools and uvloop (testing/rawhttp.py) so that they cost little beside the gateway."""
    import uvloop

    from testing.rawhttp import serve_standins

    uvloop.run(serve_standins(ports))


def gc_tracer(out: Path) -> None:
    """Every collection's pause, timed with gc.callbacks, written to `out` twice a second as
    [[end (wall clock), generation, seconds, CPU seconds], ...] for the bench to cut into turns.
    Both times: on a busy machine a collection's wall time includes the time the process was
    not scheduled, its CPU time (the thread's) does not."""
    import gc
    import threading

    pauses: list[list[float]] = []
    began = [0.0, 0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            began[:] = time.perf_counter(), time.thread_time()
        else:
            pauses.append([time.time(), info["generation"], time.perf_counter() - began[0],
                           time.thread_time() - began[1]])

    gc.callbacks.append(timed)

    def dump() -> None:
        while True:
            time.sleep(0.5)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(pauses[:]))
            tmp.replace(out)

    threading.Thread(target=dump, daemon=True).start()


def trace_governor(path: Path) -> None:
    """Every lag sample of the admission governor, as a JSON line in `path`: its clock, the lag,
    what is in flight and what it decided (the rate, the capacity it learnt, the window's
    admitted, completed and arrived rates). Patched in from here, so the product carries no
    tracing; only this process's governor (not --workers' others)."""
    from garage_node.head.gateway.admission import Governor

    sample = Governor.sample
    out = path.open("a", buffering=1)

    def traced(self: Governor, lag_s: float, now: float) -> None:
        sample(self, lag_s, now)
        out.write(json.dumps({"t": round(now, 4), "lag_ms": round(lag_s * 1000, 1), "in_flight": self.in_flight(),
                              "limiting": self.limiting, "rate": round(min(self.rate, 1e9)),
                              "capacity": round(min(self.capacity_rps, 1e9)), "admitted": round(self.admitted_rps),
                              "completed": round(self.completed_rps), "arrived": round(self.arrived_rps)}) + "\n")

    Governor.sample = traced  # type: ignore[method-assign]


def gateway(port: int, engine_ports: list[int], state: Path, gc_mode: str, gen0: int, listener: str,
            max_in_flight: int, keepalive: int, max_queue_age_s: float = 0, workers: int = 1,
            governor_trace: str = "") -> None:
    import gc

    import uvicorn

    from dataclasses import replace

    from garage_node.core.wire import EngineReport, EngineState
    from garage_node.head.config import GatewaySection
    from garage_node.head.gateway.app import create_gateway_app
    from garage_node.head.gateway.gateway import Gateway
    from testing.fakes import sample_report

    # The stand-ins never go stale: heartbeats are not what this measures.
    section = GatewaySection(stale_after_s=1e9, listen_host="127.0.0.1", port=port, workers=workers)
    if keepalive >= 0:
        section = replace(section, engine_keepalive_connections=keepalive)
    if max_in_flight > 0:
        section = replace(section, max_in_flight=max_in_flight)
    elif max_in_flight < 0:  # to measure what the limit changes
        section = replace(section, max_in_flight=10**9, max_queue_age_s=1e9)
    if max_queue_age_s > 0:
        section = replace(section, max_queue_age_s=max_queue_age_s)
    if governor_trace:
        trace_governor(Path(governor_trace))
    gw = Gateway(section, state, lambda: {})
    base = sample_report()
    for i, p in enumerate(engine_ports):
        gw.on_report(f"n{i}", replace(base, engine=EngineReport(
            state=EngineState.HEALTHY, model="m", endpoint=f"http://127.0.0.1:{p}")))
    _, secret = gw.keys.create("bench", now=time.time())
    (state / "key").write_text(secret)
    gw.start()
    app = create_gateway_app(gw)
    # The listener as `head run` builds it: the guarded protocol and loop (connguard.py),
    # with room for the load's connections from one address.
    from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol

    limits = GuardLimits(max_connections_per_client=1024)
    gc_tracer(state / "gc.json")
    if gc_mode == "freeze":
        from garage_node.head.service import settle_heap

        settle_heap()  # as `head run` does once it is up
    if gen0:
        gc.set_threshold(gen0, *gc.get_threshold()[1:])
    if listener == "fast":  # exactly as `head run` builds it (head/gateway/serve.py)
        from garage_node.head.gateway.serve import gateway_config

        config = gateway_config(section, limits, app, app.admission.protocol_hook())
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                                http=guarded_protocol(limits), loop=guarded_loop_factory(limits))
    if workers > 1:
        from garage_node.head.gateway.workers import GatewayWorkers

        pool = GatewayWorkers(gw, limits)
        pool.start()
    uvicorn.Server(config).run()


async def load(url: str, key: str, rate: float, seconds: float, grace_s: float, connections: int = 1024) -> dict:
    """Open loop for `seconds`, then at most `grace_s` more for the answers: what is not
    finished by then is cancelled and counted as `unfinished` (the target fell behind). The
    client is testing/rawhttp.py's (tens of microseconds a request: httpx's 1-1.5 ms made the
    load generator, not the gateway, the bottleneck on a 2-CPU machine)."""
    from urllib.parse import urlsplit

    from testing.rawhttp import Client, open_loop, quantile

    u = urlsplit(url)
    client = Client(u.hostname or "127.0.0.1", u.port or 80, max_connections=connections)
    data = client.build(u.path, {"model": "m", "prompt": "Hello", "max_tokens": 1}, key)
    try:
        tally = await open_loop(client, data, rate, seconds, grace_s)
    finally:
        client.close()
    ok = [r.total_s for r in tally.ok()]
    refused = [r.total_s for r in tally.refused()]
    late = [r.late_s for r in tally.results if r.status]
    return {"sent": int(rate * seconds), "ok": len(ok), "errors": tally.errors(), "unfinished": tally.unfinished,
            "refused": len(refused), "refused_p99_ms": quantile(refused, 0.99) if refused else 0.0,
            "achieved_rps": len(ok) / tally.elapsed_s, "p50_ms": quantile(ok, 0.5), "p99_ms": quantile(ok, 0.99),
            "max_ms": quantile(ok, 1.0), "load_late_p99_ms": quantile(late, 0.99) if late else 0.0,
            "error_kinds": tally.error_kinds(), "by_second": seconds_of(tally)}


def shown(r: dict) -> str:
    """A turn's figures on one line (its seconds apart)."""
    return json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k != "by_second"})


def by_seconds(r: dict) -> str:
    return ", ".join(f"{i}: {s['p99_ms']}/{s['refused']}/{s['late_p99_ms']}" for i, s in enumerate(r["by_second"]))


def back_to_normal(by_second: list[dict]) -> int | str:
    """The first second from which every second's p99 is under 10 ms with nothing refused."""
    first: int | str = "never"
    for i in range(len(by_second) - 1, -1, -1):
        s = by_second[i]
        if s["refused"] or s["p99_ms"] is None or s["p99_ms"] >= 10:
            break
        first = i
    return first


def seconds_of(tally) -> list[dict]:  # noqa: ANN001
    """Each second of the turn (by when its requests were due): served, their p99 in ms, and
    refused, so a turn right after an overload shows when the gateway was back to normal."""
    from testing.rawhttp import quantile

    out: list[dict] = []
    for sent, r in zip(tally.sent_s, tally.results, strict=True):
        while len(out) <= int(sent):
            out.append({"ok": [], "refused": 0, "late": []})
        if r.status:
            out[int(sent)]["late"].append(r.late_s)
        if r.served:
            out[int(sent)]["ok"].append(r.total_s)
        elif r.refused:
            out[int(sent)]["refused"] += 1
    return [{"ok": len(s["ok"]), "p99_ms": round(quantile(s["ok"], 0.99), 1) if s["ok"] else None,
             "refused": s["refused"], "late_p99_ms": round(quantile(s["late"], 0.99), 1) if s["late"] else None}
            for s in out]


def run(coro):  # noqa: ANN001, ANN201
    """The load on uvloop, as the gateway and the stand-ins."""
    import uvloop

    return uvloop.run(coro)


def family(pid: int) -> list[int]:
    """The gateway's processes: itself and its workers (its children; spawn's resource
    tracker, idle, among them)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def cpu_s(pid: int) -> float:
    total = 0.0
    for p in family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class RigCpu:
    """How busy the CPUs of the load and the stand-ins were, 100 ms at a time, read from
    /proc/stat by a thread of the load process during a turn. A 100 ms window at 95 % or more
    means the rig, not the gateway, may have held requests (its latencies count from when each
    request was due, so the rig's own delay shows in them)."""

    WINDOW_S = 0.1

    def __init__(self, cpus: list[int]) -> None:
        import threading

        self.cpus = cpus
        self.busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RigCpu:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _ticks(self) -> tuple[int, int]:
        busy = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                ticks = [int(x) for x in fields[:8]]
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]  # less idle and iowait
        return busy, total

    def _sample(self) -> None:
        last = self._ticks()
        while not self._stop.wait(self.WINDOW_S):
            now = self._ticks()
            if now[1] > last[1]:
                self.busy.append((now[0] - last[0]) / (now[1] - last[1]))
            last = now

    def figures(self) -> dict:
        windows = self.busy or [0.0]
        return {"rig_cpu_mean_pct": round(100 * sum(windows) / len(windows)),
                "rig_cpu_saturated_pct": round(100 * sum(b >= 0.95 for b in windows) / len(windows))}


def rig_cpus() -> list[int]:
    """The CPUs `pin` leaves to the stand-ins and the load (all of them on a 1-CPU machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[:-1] if len(cpus) >= 2 else cpus


def watched_load(url: str, key: str, rate: float, seconds: float, grace_s: float, connections: int) -> dict:
    """One turn of `load`, with how busy the rig's CPUs were meanwhile (RigCpu) in its figures."""
    with RigCpu(rig_cpus()) as rig:
        r = run(load(url, key, rate, seconds, grace_s, connections))
    r.update(rig.figures())
    return r


def rss_mb(pid: int) -> float:
    total = 0.0
    for p in family(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def pin(procs: dict[str, int]) -> None:
    """The gateway on a CPU of its own; the stand-ins and the load on others (shared on a
    2-CPU machine). Printed, with the machine's load, so a figure says what it was measured on."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print(f"pinning: none (1 CPU: {cpus})", flush=True)
        return
    # The gateway on the last CPU: the testbeds pin engines from CPU 0 up (testing/dockerd.py).
    gw, rest = cpus[-1:], rig_cpus()
    stubs, loadgen = (rest[: len(rest) // 2], rest[len(rest) // 2:]) if len(rest) >= 2 else (rest, rest)
    where = {"gateway": gw, "stand-ins": stubs, "load": loadgen}
    for role, pid in procs.items():
        for p in family(pid) if role == "gateway" else [pid]:
            os.sched_setaffinity(p, where[role])
    print("pinning: " + ", ".join(f"{role} on CPU {','.join(map(str, c))}" for role, c in where.items()), flush=True)


class CpuCap:
    """The gateway capped at `pct` % of one CPU (a cgroup v1 CFS quota with a 10 ms period, so a
    throttled gateway stalls at most a few ms at a time): on a 2-CPU machine the load generator
    cannot reach twice the uncapped gateway's ceiling, so the overload goal is measured against a
    gateway made smaller. Printed as such. Removed by name when the bench ends."""

    ROOT = Path("/sys/fs/cgroup/cpu")
    PERIOD_US = 10_000

    def __init__(self, pct: float) -> None:
        self.pct = pct
        self.paths: list[Path] = []

    def apply(self, pids: list[int]) -> bool:
        """Each of `pids` in a cgroup of its own, capped at `pct` % of one CPU."""
        if not (self.ROOT / "cpu.cfs_quota_us").exists():
            print(f"cpu cap: none (no cgroup v1 cpu controller at {self.ROOT})", flush=True)
            return False
        for pid in pids:
            path = self.ROOT / f"garage-bench-gateway-{os.getpid()}-{pid}"
            path.mkdir(exist_ok=True)
            self.paths.append(path)
            (path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(int(self.PERIOD_US * self.pct / 100)))
            (path / "cgroup.procs").write_text(str(pid))
        print(f"cpu cap: each of the gateway's {len(pids)} process(es) at {self.pct:.0f} % of one CPU "
              "(CFS quota, 10 ms period)", flush=True)
        return True

    def remove(self) -> None:
        for path in self.paths:
            if not path.exists():
                continue
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    (self.ROOT / "cgroup.procs").write_text(pid)
                except OSError:
                    pass  # it ended meanwhile
            path.rmdir()


def gc_pauses(path: Path, since: float, until: float) -> dict:
    """The gateway's collections between two wall-clock times: how many, total and longest (ms)."""
    try:
        pauses = [x for x in json.loads(path.read_text()) if since <= x[0] <= until]
    except (OSError, ValueError):
        return {"gc_count": 0, "gc_total_ms": 0.0, "gc_max_ms": 0.0, "gc_max_gen": -1, "gc_max_cpu_ms": 0.0,
                "gc_full": 0}
    longest = max(pauses, key=lambda x: x[2], default=[0.0, -1, 0.0, 0.0])
    return {"gc_count": len(pauses), "gc_total_ms": 1000 * sum(x[2] for x in pauses),
            "gc_max_ms": 1000 * longest[2], "gc_max_gen": longest[1],
            "gc_max_cpu_ms": 1000 * max((x[3] for x in pauses), default=0.0), "gc_full": sum(x[1] == 2 for x in pauses)}


def start_rig(procs: list[subprocess.Popen], me: list[str], engine_ports: list[int], gw_port: int, state: Path,
              gateway_args: list[str]) -> None:
    """The stand-ins (`me --role stub`) and the gateway (`me --role gateway`) started into `procs`,
    and both listening. A SIGTERM (a CI step's timeout) ends them too, at once; the caller
    terminates `procs` when it is done."""
    def stopped(signum: int, _frame: object) -> None:
        for proc in procs:
            proc.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    procs.append(subprocess.Popen(me + ["--role", "stub", "--ports", ",".join(map(str, engine_ports))]))
    procs.append(subprocess.Popen(me + ["--role", "gateway", "--state", str(state), *gateway_args,
                                        "--ports", ",".join(map(str, [gw_port, *engine_ports]))]))
    for port in (*engine_ports, gw_port):
        wait_port(port)


def wait_port(port: int) -> None:
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=500)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--pcs", type=int, default=8)
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds after the last request is sent before what is not answered counts as unfinished")
    p.add_argument("--gc", choices=("freeze", "plain"), default="freeze",
                   help="freeze: the gateway's start-up objects frozen as `head run` does (service.settle_heap); "
                        "plain: not (to measure the difference)")
    p.add_argument("--gen0", type=int, default=0, help="the gateway's generation-0 threshold (0: what `head run` sets)")
    p.add_argument("--listener", choices=("fast", "plain"), default="fast",
                   help="fast: uvloop and httptools as `head run` builds the listener; plain: asyncio and h11")
    p.add_argument("--max-in-flight", type=int, default=0,
                   help="[gateway] max_in_flight (0: its default; -1: no admission limit at all, as before #22)")
    p.add_argument("--engine-keepalive", type=int, default=-1,
                   help="[gateway] engine_keepalive_connections (-1: its default)")
    p.add_argument("--after", type=float, default=0,
                   help="then a turn through the gateway at this rate, at once: is it back to normal after the load?")
    p.add_argument("--max-queue-age", type=float, default=0,
                   help="[gateway] max_queue_age_s (0: its default)")
    p.add_argument("--connections", type=int, default=1024,
                   help="the load's connections at most (it opens one per request waiting for an answer, up to this)")
    p.add_argument("--gateway-cpu", type=float, default=0,
                   help="cap the gateway at this %% of one CPU (cgroup), to overload it with this machine's load")
    p.add_argument("--workers", type=int, default=1,
                   help="gateway processes on the port ([gateway] workers): the head's and N-1 workers")
    p.add_argument("--governor-trace", default="",
                   help="write the gateway's admission governor, sample by sample, as JSON lines to this file")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--ports", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "stub":
        return stub([int(x) for x in args.ports.split(",")])
    if args.role == "gateway":
        port, *engines = [int(x) for x in args.ports.split(",")]
        return gateway(port, engines, Path(args.state), args.gc, args.gen0, args.listener, args.max_in_flight,
                       args.engine_keepalive, args.max_queue_age, args.workers, args.governor_trace)

    gw_port, *engine_ports = free_ports(args.pcs + 1)
    state = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    cap = CpuCap(args.gateway_cpu) if args.gateway_cpu else None
    procs: list[subprocess.Popen] = []
    try:
        start_rig(procs, [sys.executable, __file__], engine_ports, gw_port, state,
                  ["--gc", args.gc, "--gen0", str(args.gen0), "--listener", args.listener,
                   "--max-in-flight", str(args.max_in_flight), "--engine-keepalive", str(args.engine_keepalive),
                   "--max-queue-age", str(args.max_queue_age), "--workers", str(args.workers),
                   "--governor-trace", str(Path(args.governor_trace).resolve()) if args.governor_trace else ""])
        key = (state / "key").read_text()
        gw_pid = procs[1].pid
        pin({"stand-ins": procs[0].pid, "gateway": gw_pid, "load": os.getpid()})
        if cap is not None:
            cap.apply(family(gw_pid))
        print(f"gateway: {args.workers} process(es), gc {args.gc}, gen0 {args.gen0 or 'default'}, listener {args.listener}; "
              f"load connections at most {args.connections}; machine load {os.getloadavg()[0]:.1f}", flush=True)
        run(load(f"http://127.0.0.1:{gw_port}/v1/completions", key, 50, 2, args.grace))  # warm up
        results = {}
        for turn in ("direct", "gateway", "direct", "gateway"):
            url = (f"http://127.0.0.1:{engine_ports[0]}/v1/completions" if turn == "direct"
                   else f"http://127.0.0.1:{gw_port}/v1/completions")
            c0, t0, w0 = cpu_s(gw_pid), time.monotonic(), time.time()
            r = watched_load(url, key, args.rate, args.seconds, args.grace, args.connections)
            if turn == "gateway":
                used = cpu_s(gw_pid) - c0
                r["gateway_cpu_pct"] = 100 * used / (time.monotonic() - t0)
                r["cpu_ms_per_request"] = 1000 * used / max(1, r["ok"] + r["refused"])
                r["gateway_rss_mb"] = rss_mb(gw_pid)
                time.sleep(0.6)  # the tracer's next write
                r.update(gc_pauses(state / "gc.json", w0, time.time()))
            results.setdefault(turn, []).append(r)
            print(f"{turn:8} {shown(r)}", flush=True)
            if turn == "gateway":
                print(f"  second by second (p99 ms / refused / load's delay p99 ms): {by_seconds(r)}", flush=True)
        if args.after:
            r = watched_load(f"http://127.0.0.1:{gw_port}/v1/completions", key, args.after, args.seconds, args.grace,
                             args.connections)
            print(f"after    {shown(r)}", flush=True)
            print(f"  right after: {args.after:.0f} requests/s through the gateway: p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, refused {r['refused']}, unfinished {r['unfinished']}")
            print(f"  second by second (p99 ms / refused / load's delay p99 ms): {by_seconds(r)}")
            print(f"  back to normal (every later second p99 < 10 ms, none refused) from second "
                  f"{back_to_normal(r['by_second'])}")
        d = min(results["direct"], key=lambda r: r["p99_ms"])
        g = min(results["gateway"], key=lambda r: r["p99_ms"])
        print(f"\n{args.rate:.0f} requests/s for {args.seconds:.0f} s over {args.pcs} stand-in PCs (best of two turns each):")
        print(f"  direct : p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms, {d['achieved_rps']:.0f}/s, errors {d['errors']}, "
              f"unfinished {d['unfinished']}")
        print(f"  gateway: p50 {g['p50_ms']:.1f} ms, p99 {g['p99_ms']:.1f} ms, {g['achieved_rps']:.0f}/s, errors {g['errors']}, "
              f"unfinished {g['unfinished']}")
        print(f"  overhead: p50 +{g['p50_ms'] - d['p50_ms']:.1f} ms, p99 +{g['p99_ms'] - d['p99_ms']:.1f} ms; "
              f"gateway CPU {g['gateway_cpu_pct']:.0f} % of a core, {g['cpu_ms_per_request']:.2f} ms per request, "
              f"RSS {g['gateway_rss_mb']:.0f} MB")
        print(f"  gateway collections: {g['gc_count']} ({g['gc_full']} full), {g['gc_total_ms']:.1f} ms in all, "
              f"longest {g['gc_max_ms']:.1f} ms ({g['gc_max_cpu_ms']:.1f} ms of CPU); refused (503 overloaded) {g['refused']}, their p99 "
              f"{g['refused_p99_ms']:.1f} ms")
        for turn, runs in results.items():
            for r in runs:
                if r["unfinished"]:
                    # The latencies above are of the requests answered in time only.
                    print(f"  FELL BEHIND ({turn}): {r['unfinished']} of {r['sent']} requests not answered within "
                          f"{args.grace:.0f} s of the last one sent; the rate is above what this machine sustains")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if cap is not None:
            cap.remove()


if __name__ == "__main__":
    main()
