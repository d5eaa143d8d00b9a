"""Benchmark: how well audits tell honest PCs from cheating ones (issue #20). Prints figures;
asserts nothing.

Real engines (the vLLM CPU image, trained tiny models of image/engine/make_audit_models.py):
PCs that generate answers (honest; other weights under the same name; honest rounded to 4 and
8 bits; one layer scaled by 1.1; an honest engine whose answers are cut at half of max_tokens
and said to have stopped), and a verifier (another honest engine) that re-scores every answer
teacher-forced (/tokenize, then /v1/completions with prompt_logprobs), with the head's own
scoring (garage_node/head/audit/score.py). Then, from the measured per-audit scores:

- per-token bad rates (greedy, delta 0.5/1/2 nat) and z's (sampled), per PC kind;
- the share of always-cheating PCs quarantined within 250 of their requests (Monte Carlo over
  the measured scores, with the sampler's rates: new_rate for a PC's first new_requests
  requests, rate after, suspect_rate while its record leans to cheating, canaries), for a new
  PC and an established one; the requests a PC that cheats on 10 % of requests takes;
- false quarantines over all the honest requests (10,000 by default, at concurrencies 1..32,
  every one scored): the highest SPRT sum reached against the threshold;
- the verifier's CPU time as a share of the PCs' engine CPU (containers' cgroup CPU time).

Goals: >= 99 % of always-cheaters quarantined within 250 requests; 0 honest PCs quarantined
over 10,000 honest requests; verifier CPU <= 3 % of the PCs'.

Run as root with dockerd up and the CPU image built:
    .venv/bin/python bench/audit.py [--honest 10000] [--cheat 400] [--save out/audit.json]
    .venv/bin/python bench/audit.py --load out/audit.json   # the analysis again, no engines
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from garage_node.head.audit import score as scoring  # noqa: E402
from garage_node.head.audit import sampling, sprt, verifier  # noqa: E402
from garage_node.head.audit.book import upper_rate  # noqa: E402
from garage_node.head.config import AuditSection  # noqa: E402
from testing.cheats import client_requests  # noqa: E402
from testing.dockerd import TINY_MODEL, EngineContainer, audit_model_dirs  # noqa: E402

K = verifier.K
CONCURRENCY = (1, 2, 4, 8, 16, 32)
GENERATORS = ("honest", "other", "q4", "q8", "layer")


# -- what clients ask: testing.cheats.client_requests


@dataclass
class Answer:
    body: dict[str, Any]
    text: str
    finish_reason: str | None
    completion_tokens: int | None
    concurrency: int


def ask(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[str, str | None, int | None]:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(url + path, json={"model": TINY_MODEL, **body}, timeout=300)
    r.raise_for_status()
    d = r.json()
    ch = d["choices"][0]
    text = ch["message"]["content"] if "messages" in body else ch["text"]
    return text or "", ch.get("finish_reason"), (d.get("usage") or {}).get("completion_tokens")


def generate(url: str, bodies: Sequence[dict[str, Any]], concurrency: int,
             rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
             relabel: Callable[[str | None], str | None] | None = None) -> list[Answer]:
    with httpx.Client(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        def one(body: dict[str, Any]) -> Answer:
            sent = rewrite(body) if rewrite else body
            text, fin, used = ask(client, url, sent)
            return Answer(body, text, relabel(fin) if relabel else fin, used, concurrency)
        with cf.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, bodies))


# -- the verifier's view

DELTAS = (0.5, 1.0, 2.0)
GAPS_PER_KIND = 400  # answers per PC kind whose per-token gaps are kept (the delta table)


def sample_of(a: Answer) -> verifier.Sample:
    path = "/v1/chat/completions" if "messages" in a.body else "/v1/completions"
    return verifier.Sample(at=time.time(), node_id="bench", model=TINY_MODEL, path=path,
                           request={"model": TINY_MODEL, **a.body}, text=a.text, finish_reason=a.finish_reason,
                           completion_tokens=a.completion_tokens)


def rescore_all(url: str, answers: Sequence[Answer], concurrency: int = 4) -> list[dict[str, Any]]:
    """Every answer re-scored by the head's own verifier client (audit/verifier.py), as the
    audit loop does it."""
    async def run() -> list[dict[str, Any]]:
        eng = verifier.Engine(name="verifier", url=url, key="")
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=300) as http:
            # The verifier learns its EOS ids from its own stops (as the audit loop's does).
            for a in answers[:50]:
                if eng.eos.get(TINY_MODEL):
                    break
                await eng.check(http, sample_of(a))

            async def one(a: Answer) -> dict[str, Any]:
                async with sem:
                    s = await eng.check(http, sample_of(a))
                return {"score": asdict(s), "concurrency": a.concurrency, "finish": a.finish_reason}
            return await asyncio.gather(*(one(a) for a in answers))
    return asyncio.run(run())


def gaps(client: httpx.Client, url: str, a: Answer) -> list[float]:
    """The per-token gaps of an answer's own tokens (the verifier's top-1 minus the PC token's
    logprob), for the table of bad rates at several deltas."""
    b = a.body
    tk = ({"model": TINY_MODEL, "messages": b["messages"], "add_generation_prompt": True} if "messages" in b
          else {"model": TINY_MODEL, "prompt": b["prompt"]})
    prompt_ids = client.post(url + "/tokenize", json=tk).json()["tokens"]
    comp = client.post(url + "/tokenize", json={"model": TINY_MODEL, "prompt": a.text,
                                               "add_special_tokens": False}).json()["tokens"]
    ids = prompt_ids + comp
    r = client.post(url + "/v1/completions", json={"model": TINY_MODEL, "prompt": ids, "max_tokens": 1,
                                                   "temperature": 0, "prompt_logprobs": K}, timeout=300)
    r.raise_for_status()
    pos = scoring.positions(r.json()["choices"][0]["prompt_logprobs"], ids, len(prompt_ids), K)
    return [round(p.top[0] - p.logprob, 5) for p in pos]


def gaps_all(url: str, answers: Sequence[Answer], concurrency: int = 4) -> list[list[float]]:
    greedy = [a for a in answers if a.body.get("temperature") == 0.0][:GAPS_PER_KIND]
    with httpx.Client(timeout=300) as client, cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda a: gaps(client, url, a), greedy))


# -- collecting: engines, answers, scores

PORTS = {"verifier": 18931, "honest": 18932, "other": 18933, "q4": 18934, "q8": 18935, "layer": 18936, "q3": 18937}


def cut_short(body: dict[str, Any]) -> dict[str, Any]:
    """The truncating PC: generates half the tokens asked for (half the work)..."""
    return {**body, "max_tokens": max(1, body["max_tokens"] // 2)}


def say_stop(fin: str | None) -> str | None:
    """...and says the answer ended by itself."""
    return "stop" if fin == "length" else fin


def collect(n_honest: int, n_cheat: int, kinds: Sequence[str], log: Callable[[str], None]) -> dict[str, Any]:
    dirs = audit_model_dirs()
    verifier_eng = EngineContainer("garage-bench-audit-verifier", dirs["honest"], PORTS["verifier"], cpus="1")
    verifier_eng.start()
    out: dict[str, Any] = {"answers": {}, "scores": {}, "gaps": {}, "cpu": {}}
    try:
        verifier_eng.wait_ready()
        for kind in kinds:
            model = "honest" if kind in ("honest", "truncate") else kind
            eng = EngineContainer(f"garage-bench-audit-{model}", dirs[model], PORTS[model], cpus="0")
            eng.start()
            try:
                eng.wait_ready()
                t0, cpu0 = time.monotonic(), eng.cpu_usec()
                answers: list[Answer] = []
                if kind == "honest":
                    per = max(1, n_honest // len(CONCURRENCY))
                    for i, c in enumerate(CONCURRENCY):
                        answers += generate(eng.url, client_requests(per, seed=100 + i), c)
                        log(f"honest: {len(answers)} answers (concurrency {c})")
                elif kind == "truncate":
                    answers = generate(eng.url, client_requests(n_cheat, seed=7), 8, rewrite=cut_short, relabel=say_stop)
                else:
                    answers = generate(eng.url, client_requests(n_cheat, seed=7), 8)
                gen_cpu, gen_s = eng.cpu_usec() - cpu0, time.monotonic() - t0
            finally:
                eng.stop()
            v0, t1 = verifier_eng.cpu_usec(), time.monotonic()
            scores = rescore_all(verifier_eng.url, answers)
            ver_cpu, ver_s = verifier_eng.cpu_usec() - v0, time.monotonic() - t1
            tokens = sum(s["score"]["tokens_counted"] for s in scores)
            out["answers"][kind] = [asdict(a) for a in answers]
            out["scores"][kind] = scores
            out["gaps"][kind] = gaps_all(verifier_eng.url, answers)
            out["cpu"][kind] = {"requests": len(answers), "tokens": tokens, "gen_cpu_s": gen_cpu / 1e6,
                                "gen_wall_s": gen_s, "verify_cpu_s": ver_cpu / 1e6, "verify_wall_s": ver_s}
            log(f"{kind}: {len(answers)} answers, {tokens} tokens; PC CPU {gen_cpu / 1e6:.1f} s, "
                f"verifier CPU {ver_cpu / 1e6:.1f} s")
    finally:
        verifier_eng.stop()
    return out


# -- analysis

def token_table(data: dict[str, Any]) -> list[str]:
    """Per kind: greedy per-token bad rates at each delta (the answers' own tokens); the share of
    greedy audits with a bad token (delta 1); sampled z's; early stops flagged; usage inflated."""
    lines = [f"{'PC':<9} {'audits':>6} {'greedy tok':>10} " + " ".join(f"bad@{d:<4}" for d in DELTAS)
             + f" {'k>0':>6} {'z mean':>7} {'z sd':>5} {'|z|>3':>6} {'early':>6} {'usage':>6}"]
    for kind, rows in data["scores"].items():
        greedy = [r["score"] for r in rows if r["score"]["greedy"]]
        zs = [r["score"]["z"] for r in rows if not r["score"]["greedy"]]
        toks = [g for gs in data.get("gaps", {}).get(kind, []) for g in gs]
        rates = [sum(1 for g in toks if g > d) / max(1, len(toks)) for d in DELTAS]
        any_bad = sum(1 for x in greedy if x["bad"] > 0) / max(1, len(greedy))
        early = sum(1 for r in rows if r["score"]["early_stop"]) / max(1, len(rows))
        usage = sum(1 for r in rows if r["score"]["usage_inflated"]) / max(1, len(rows))
        lines.append(f"{kind:<9} {len(rows):>6} {len(toks):>10} " + " ".join(f"{x:8.4f}" for x in rates)
                     + f" {any_bad:6.3f} {statistics.fmean(zs) if zs else 0:7.2f} "
                     + f"{statistics.pstdev(zs) if len(zs) > 1 else 0:5.2f} "
                     + f"{sum(1 for z in zs if abs(z) > 3) / max(1, len(zs)):6.3f} {early:6.3f} {usage:6.3f}")
    return lines


def by_concurrency(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'concurrency':>11} {'audits':>6} {'greedy tok':>10} {'bad tok':>7} {'early':>5} "
             f"{'z sd':>6} {'max|z|':>7}"]
    for c in sorted({r["concurrency"] for r in rows}):
        rs = [r for r in rows if r["concurrency"] == c]
        n = sum(r["score"]["n"] for r in rs if r["score"]["greedy"])
        k = sum(r["score"]["bad"] for r in rs if r["score"]["greedy"])
        zs = [r["score"]["z"] for r in rs if not r["score"]["greedy"]]
        lines.append(f"{c:>11} {len(rs):>6} {n:>10} {k:>7} {sum(r['score']['early_stop'] for r in rs):>5} "
                     f"{statistics.pstdev(zs) if len(zs) > 1 else 0:6.2f} {max(map(abs, zs), default=0):7.2f}")
    return lines


def score_of(row: dict[str, Any]) -> scoring.Score:
    return scoring.Score(**row["score"])


AUDIT = AuditSection()  # the head's defaults: rates, canary_rate, false_quarantine
SHUFFLES = 20


def requests_to_quarantine(draw: Callable[[random.Random], scoring.Score], rng: random.Random, h: sprt.Hypotheses,
                           t: sprt.Thresholds, served_before: int, limit: int) -> int | None:
    """One PC's life: requests until quarantine (None: not within `limit`). Each request goes
    through the head's own sampler (new_rate for the PC's first new_requests requests, rate
    after, suspect_rate while its record leans to cheating); besides, canary_rate of its
    requests are canaries (always audited). `served_before` requests already served: an
    established PC, its honest record at the floor (the best a long honest record can bank)."""
    sampler = sampling.Sampler(sampling.Rates.of(AUDIT), rng.random)
    sampler.seed({"pc": served_before})
    rec = sprt.Record()
    if served_before >= AUDIT.new_requests:
        rec = sprt.Record(sums=dict.fromkeys(sprt.TESTS, t.floor))
    for i in range(1, limit + 1):
        sampler.suspects = frozenset({"pc"}) if rec.suspect else frozenset()
        if sampler.take("pc") or rng.random() < AUDIT.canary_rate:
            step = sprt.weigh(rec, draw(rng), h, t)
            rec = step.record
            if step.quarantine:
                return i
    return None


def monte_carlo(cheat: list[scoring.Score], honest: list[scoring.Score], share: float, h: sprt.Hypotheses,
                t: sprt.Thresholds, served_before: int, runs: int, limit: int,
                seed: int = 1) -> list[int | None]:
    """`runs` PCs that cheat on `share` of their requests (each audit draws a measured score of a
    cheating answer with that probability, else an honest one)."""
    rng = random.Random(seed)

    def draw(r: random.Random) -> scoring.Score:
        return r.choice(cheat) if r.random() < share else r.choice(honest)
    return [requests_to_quarantine(draw, rng, h, t, served_before, limit) for _ in range(runs)]


def honest_walk(rows: list[dict[str, Any]], h: sprt.Hypotheses, t: sprt.Thresholds) -> tuple[float, str, bool]:
    """Every honest answer weighed in order by one PC's SPRT (each audited, as if the rate
    were 100 %): the highest sum any test reached, which test, and whether it crossed."""
    rec, top, name, crossed = sprt.Record(), -math.inf, "", False
    for r in rows:
        step = sprt.weigh(rec, score_of(r), h, t)
        rec = step.record
        crossed = crossed or step.quarantine is not None
        k, v = rec.worst
        if v > top:
            top, name = v, k
    return top, name, crossed


def eps0_of(rows: list[dict[str, Any]]) -> float:
    """The honest rate as `head audit calibrate` stores it: a 99 % upper bound on the share of
    greedy answers with a bad token (delta 1)."""
    greedy = [r["score"] for r in rows if r["score"]["greedy"] and r["score"]["n"] > 0]
    return upper_rate(sum(1 for s in greedy if s["bad"] > 0), len(greedy))


def pct(xs: list[int | None], limit: int) -> str:
    caught = sorted(x for x in xs if x is not None and x <= limit)
    share = len(caught) / len(xs)
    med = statistics.median(caught) if caught else float("nan")
    p99 = caught[int(0.99 * len(xs)) - 1] if len(caught) >= int(0.99 * len(xs)) and caught else None
    return f"{100 * share:6.2f} % within {limit} (median {med:.0f}, 99th pct {p99 if p99 else '>' + str(limit)})"


def analyse(data: dict[str, Any], false_quarantine: float, runs: int, log: Callable[[str], None],
            over: dict[str, float] | None = None, calibrated: bool = True) -> None:
    scores = data["scores"]
    log("Per-token and per-audit figures (verifier: an honest engine on its own CPU):")
    for line in token_table(data):
        log("  " + line)
    if "honest" in scores:
        log("Honest answers by concurrency (the batch size they were generated at):")
        for line in by_concurrency(scores["honest"]):
            log("  " + line)
    honest_rows = scores.get("honest", [])
    if not honest_rows:
        return
    eps0 = eps0_of(honest_rows)
    h = sprt.Hypotheses.of(eps0 if calibrated else None)
    if over:  # what-ifs: the hypotheses' settings given on the command line
        h = replace(h, **over)
    t = sprt.Thresholds.of(false_quarantine)
    log(f"SPRT: false_quarantine {false_quarantine}, threshold {t.upper:.2f}, cap {t.cap:.2f}, floor {t.floor:.2f}; "
        f"honest eps0 (99 % bound on the share of greedy answers with a bad token) {eps0:.4f}, "
        f"{'used' if calibrated else 'NOT used (uncalibrated default)'}; {h}")
    top, name, crossed = honest_walk(honest_rows, h, t)
    log(f"False quarantines: {len(honest_rows)} honest answers (concurrency 1..32) all scored by one PC's test: "
        f"highest sum {top:.2f} ({name}) against threshold {t.upper:.2f}: {'QUARANTINED' if crossed else 'not quarantined'}")
    # The same answers in other orders (as many PCs' lives): how close any came.
    rng = random.Random(5)
    walks = [honest_walk(rng.sample(honest_rows, len(honest_rows)), h, t) for _ in range(SHUFFLES)]
    worst = max(walks)
    log(f"  in {SHUFFLES} other orders: highest sum {worst[0]:.2f} ({worst[1]}), "
        f"{sum(1 for w in walks if w[2])} of {SHUFFLES} quarantined")
    honest = [score_of(r) for r in honest_rows]
    # Honest PCs at the sampler's real rates (audits drawn from the measured honest scores).
    res = monte_carlo(honest, honest, 0.0, h, t, 0, runs, 10_000, seed=2)
    log(f"  honest PCs at the sampler's rates, {runs} PCs x 10,000 requests: "
        f"{sum(1 for x in res if x is not None)} quarantined")
    for kind in [k for k in scores if k != "honest"]:
        cheat = [score_of(r) for r in scores[kind]]
        for label, before in (("new PC", 0), ("established PC", 10_000)):
            res = monte_carlo(cheat, honest, 1.0, h, t, before, runs, 250)
            log(f"  always-{kind:<8} {label:<15} quarantined {pct(res, 250)}")
    for kind in [k for k in ("other", "q4", "truncate") if k in scores]:
        cheat = [score_of(r) for r in scores[kind]]
        res = monte_carlo(cheat, honest, 0.1, h, t, 10_000, max(200, runs // 5), 20_000)
        log(f"  10 %-{kind:<10} established PC quarantined {pct(res, 20_000)}")
    cpu = data.get("cpu", {})
    if "honest" in cpu:
        c = cpu["honest"]
        per_req_pc = c["gen_cpu_s"] / c["requests"]
        ver = [cpu[k] for k in cpu]
        per_audit = sum(v["verify_cpu_s"] for v in ver) / sum(v["requests"] for v in ver)
        log(f"CPU: a PC's engine {1000 * per_req_pc:.1f} ms per request ({c['requests']} requests, "
            f"{c['tokens'] / c['requests']:.1f} tokens each); the verifier {1000 * per_audit:.1f} ms per audit")
        for label, p in ((f"established (rate {AUDIT.rate:.0%} + canaries {AUDIT.canary_rate:.1%})",
                          AUDIT.rate + AUDIT.canary_rate),
                         (f"new PCs (new_rate {AUDIT.new_rate:.0%} + canaries)", AUDIT.new_rate + AUDIT.canary_rate),
                         (f"suspect (suspect_rate {AUDIT.suspect_rate:.0%})", AUDIT.suspect_rate)):
            log(f"  verifier CPU / PCs' engine CPU, {label}: {100 * p * per_audit / per_req_pc:.2f} %")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--honest", type=int, default=10_000, help="honest requests (spread over concurrencies 1..32)")
    ap.add_argument("--cheat", type=int, default=400, help="requests per cheating PC kind")
    ap.add_argument("--kinds", default="honest,other,q3,q4,q8,layer,truncate")
    ap.add_argument("--runs", type=int, default=2000, help="Monte Carlo PCs per case")
    ap.add_argument("--false-quarantine", type=float, default=AUDIT.false_quarantine)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a what-if for the sequential test's hypotheses (sprt.Hypotheses: eps1, effect, z_spread, "
                         "stop0, stop1, ...), repeatable")
    ap.add_argument("--uncalibrated", action="store_true",
                    help="weigh with the default honest rate (sprt.EPS0_DEFAULT), as for a model nobody calibrated")
    ap.add_argument("--save", type=Path, help="keep the measured answers and scores here (JSON)")
    ap.add_argument("--load", type=Path, help="analyse a saved run instead of measuring")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)

    if args.load:
        data = json.loads(args.load.read_text())
    else:
        data = collect(args.honest, args.cheat, args.kinds.split(","), log)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            args.save.write_text(json.dumps(data))
    over = {k: float(v) for k, _, v in (x.partition("=") for x in args.set)}
    analyse(data, args.false_quarantine, args.runs, log, over, calibrated=not args.uncalibrated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
