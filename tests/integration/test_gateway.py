"""The region's front door on real parts: a real head (its gateway on port 8080) and two PCs,
each serving the real vLLM CPU image through a dockerd of its own (testing/dockerd.py).

Requests go to the head with an API key, as a user's would, and come back from a PC; the
ledger's counts equal what vLLM reported; keys are refused as they should be; a draining PC
takes nothing new and finishes its stream; a PC whose engine dies under load costs no request
that had not begun to stream; Prometheus parses the head's metrics.

The head runs its gateway as two processes ([gateway] workers = 2, head/gateway/workers.py):
every check here holds whichever of them a connection lands on, and the ledger, the metrics
and the keys are the region's, not one process's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testing.dockerd import CACHE, TEST_IMAGE, TINY_MODEL, cgroup_dirs, engine_toml, tiny_model_dir
from testing.region import Testbed, missing_prerequisite, namespaces, wait_for

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = "http://127.0.0.1:8080"
METRICS = "http://127.0.0.1:9464/metrics"


def _engine_missing() -> str | None:
    if why := missing_prerequisite():
        return why
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no running dockerd (image/engine/ensure-dockerd.sh starts one)"
    if subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True).returncode != 0:
        return f"image {TEST_IMAGE} not built (image/engine/build-vllm-cpu-image.sh)"
    return None


pytestmark = [pytest.mark.engine, pytest.mark.skipif(bool(_engine_missing()), reason=str(_engine_missing()))]


def healthy(node, timeout=600, predicate=None) -> dict:
    def ok(s):
        return s["engine"]["state"] == "healthy" and (predicate is None or predicate(s))
    return node.wait_state("joined", timeout, predicate=ok)


@pytest.fixture(scope="module")
def left_behind() -> Iterator[list[Testbed]]:
    """Checks, once the testbed is cleaned up (this fixture is set up before `testbed`, so it is
    torn down after it), that nothing was left behind: namespaces, the PCs' containers (by
    cgroup), their mounts."""
    beds: list[Testbed] = []
    yield beds
    for tb in beds:
        slots = [h.dockerd.slot for h in tb.hosts if getattr(h, "dockerd", None) is not None]
        assert not [ns for ns in namespaces() if ns.startswith(tb.prefix)]
        assert not [s for s in slots if cgroup_dirs(s)]
        assert str(CACHE) not in Path("/proc/mounts").read_text()


@pytest.fixture(scope="module")
def region(left_behind: list[Testbed], testbed: Testbed) -> Testbed:
    model = tiny_model_dir()
    tb = testbed
    left_behind.append(tb)
    head = tb.start_head(extra="[gateway]\nworkers = 2\n")
    pcs = [tb.add_engine_node(name, engine_toml(model, cpus=str(i))) for i, name in enumerate(("pc-a", "pc-b"))]
    for pc in pcs:
        pc.configure(head.token())
        pc.start()
    for pc in pcs:
        healthy(pc)
    tb.key = hc(head, "key", "create", "tester").stdout.strip()
    wait_for(lambda: models(head, tb.key).get(TINY_MODEL) == 2, 60, "both PCs in the gateway's table")
    return tb


def hc(head, *args: str) -> subprocess.CompletedProcess:
    """`garage-node head ...` with the testbed head's config."""
    return head.cli("head", *args, "--config", str(head.config))


def curl(head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return head.run(["curl", "-s", "--max-time", str(int(timeout)), *args], check=False, timeout=timeout + 10)


def post(head, key: str, path: str, body: dict, timeout: float = 120) -> tuple[int, dict, dict[str, str]]:
    """(status, JSON body, headers) of a POST to the gateway from inside the head's namespace."""
    res = curl(head, "-D", "-", "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {key}",
               "-d", json.dumps(body), f"{GATEWAY}{path}", timeout=timeout)
    head_part, _, body_part = res.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head_part.splitlines()
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, json.loads(body_part) if body_part.strip().startswith("{") else {}, headers


def models(head, key: str) -> dict[str, int]:
    res = curl(head, "-H", f"Authorization: Bearer {key}", f"{GATEWAY}/v1/models")
    try:
        return {m["id"]: m["pcs_serving"] for m in json.loads(res.stdout)["data"]}
    except (ValueError, KeyError):
        return {}


def usage(head, by: str = "key") -> dict[str, dict]:
    return {r[by]: r for r in json.loads(hc(head, "usage", "--by", by, "--json").stdout)}


def load(head, key: str, *args: str, timeout: float = 300) -> list[dict]:
    res = head.run([sys.executable, str(ROOT / "testing/loadgen.py"), GATEWAY, key, TINY_MODEL, *args],
                   check=True, timeout=timeout)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def test_a_pc_cannot_reach_another_pcs_engine(region):
    """Only the head calls engines: the hub forwards no node-to-node TCP but Ray's ports, each
    engine is published on its PC's overlay address only, and it demands its own key."""
    a, b = region.hosts[1], region.hosts[2]
    b_overlay = b.status()["overlay"]["address"]
    a.run(["ping", "-c", "1", "-W", "5", b_overlay])  # the overlay path from A to B exists ...
    res = a.run(["curl", "-s", "--max-time", "5", f"http://{b_overlay}:8000/v1/models"], check=False)
    assert res.returncode != 0, res.stdout  # ... but not to B's engine
    res = a.run(["curl", "-s", "--max-time", "5", f"http://{b.ip}:8000/v1/models"], check=False)
    assert res.returncode != 0, res.stdout  # nor on B's LAN address
    # From the head, B's engine answers only with B's key, which A does not have.
    url = f"http://{b_overlay}:8000/v1/models"
    assert curl(region.head, "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {a.engine_key()}",
                url).stdout == "401"
    assert curl(region.head, "-o", "/dev/null", "-w", "%{http_code}", "-H", f"Authorization: Bearer {b.engine_key()}",
                url).stdout == "200"
    assert a.engine_key() != b.engine_key()


def test_a_completion_comes_back_from_a_pc(region):
    head = region.head
    names = {pc.name for pc in region.hosts[1:]}
    status, body, headers = post(head, region.key, "/v1/completions",
                                 {"model": TINY_MODEL, "prompt": "Hello", "max_tokens": 8})
    assert status == 200, body
    assert body["model"] == TINY_MODEL and body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 8
    assert headers["x-garage-node"] in names
    status, chat, _ = post(head, region.key, "/v1/chat/completions",
                           {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert status == 200 and chat["object"] == "chat.completion", chat


def test_streams_end_with_done_and_usage_is_accounted_exactly(region):
    head = region.head
    key = hc(head, "key", "create", "streams").stdout.strip()
    plain = load(head, key, "--requests", "4", "--concurrency", "2", "--stream", "--max-tokens", "12")
    assert all(r["status"] == 200 and r["done"] and r["error"] is None for r in plain), plain
    # The client did not ask for usage: the gateway asked vLLM for it and stripped it again.
    assert all(r["usage"] is None for r in plain)
    wait_for(lambda: usage(head).get("streams", {}).get("requests") == 4, 15, "the ledger to count the streams")
    before = usage(head)["streams"]["total_tokens"]
    asked = load(head, key, "--requests", "6", "--concurrency", "2", "--stream", "--usage", "--max-tokens", "12")
    whole = load(head, key, "--requests", "3", "--concurrency", "2", "--max-tokens", "7")
    reported = [r["usage"] for r in asked + whole]
    assert all(u and u["total_tokens"] > 0 for u in reported), reported
    # What vLLM reported, token for token, is what the ledger holds.
    expected = before + sum(u["total_tokens"] for u in reported)
    wait_for(lambda: usage(head)["streams"]["total_tokens"] == expected, 15, "the ledger to hold every token")
    assert usage(head)["streams"]["requests"] == 13
    by_model = usage(head, "model")
    assert by_model[TINY_MODEL]["total_tokens"] >= expected


def test_models_and_keys_are_refused_as_they_should_be(region):
    head = region.head
    assert models(head, region.key) == {TINY_MODEL: 2}
    status, body, _ = post(head, "gk-wrong", "/v1/completions", {"model": TINY_MODEL, "prompt": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = post(head, region.key, "/v1/completions", {"model": "no/such-model", "prompt": "x"})
    assert status == 404 and TINY_MODEL in body["error"]["message"]
    status, body, _ = post(head, region.key, "/v1/completions", {"prompt": "no model"})
    assert status == 400 and body["error"]["param"] == "model"
    other = hc(head, "key", "create", "other-model", "--models", "someone/else").stdout.strip()
    assert post(head, other, "/v1/completions", {"model": TINY_MODEL, "prompt": "x"})[0] == 404
    quota = hc(head, "key", "create", "small", "--quota", "5").stdout.strip()
    assert post(head, quota, "/v1/completions", {"model": TINY_MODEL, "prompt": "x", "max_tokens": 8})[0] == 200
    wait_for(lambda: usage(head).get("small", {}).get("total_tokens", 0) >= 5, 15, "the ledger")
    status, body, _ = post(head, quota, "/v1/completions", {"model": TINY_MODEL, "prompt": "x"})
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    rpm = hc(head, "key", "create", "slow", "--rpm", "1").stdout.strip()
    assert post(head, rpm, "/v1/completions", {"model": TINY_MODEL, "prompt": "x", "max_tokens": 1})[0] == 200
    status, _, headers = post(head, rpm, "/v1/completions", {"model": TINY_MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 429 and int(headers["retry-after"]) >= 1
    short = hc(head, "key", "create", "short", "--ttl", "1s").stdout.strip()
    time.sleep(1.5)
    assert post(head, short, "/v1/completions", {"model": TINY_MODEL, "prompt": "x"})[1]["error"]["code"] == "expired_api_key"
    hc(head, "key", "revoke", "slow")
    time.sleep(2.5)  # the gateway holds a key it checked for 2 s
    assert post(head, rpm, "/v1/completions", {"model": TINY_MODEL, "prompt": "x"})[1]["error"]["code"] == "revoked_api_key"
    listed = {k["name"]: k for k in json.loads(hc(head, "key", "list", "--json").stdout)}
    assert listed["slow"]["state"] == "revoked" and listed["short"]["state"] == "expired"
    assert all(k["hint"] and len(k["hint"]) <= 8 for k in listed.values())
    assert region.key not in hc(head, "key", "list").stdout


def test_metrics_parse_and_cover_the_region(region):
    head = region.head
    text = curl(head, METRICS).stdout
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["garage_gateway_requests_total"].value >= 1
    assert "garage_gateway_time_to_first_token_seconds_bucket" in samples
    assert "garage_gateway_tokens_total" in samples and "garage_node_engine_state" in samples
    endpoints = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "garage_gateway_endpoints"]
    assert sum(s.value for s in endpoints if s.labels["state"] == "healthy") == 2


def test_pcs_see_the_tokens_they_served(region):
    head = region.head
    served = usage(head, "node")
    for pc in region.hosts[1:]:
        node_id = pc.status()["node_id"]
        if node_id not in served:
            continue
        want = served[node_id]["total_tokens"]
        pc.wait_state("joined", 30, predicate=lambda s, want=want: (s.get("tokens_served") or {}).get("total", 0) >= want)
        assert "tokens today" in pc.run(pc.cmd("status")).stdout
    assert "TOKENS" in hc(head, "nodes").stdout


def test_a_draining_pc_finishes_its_stream_and_takes_nothing_new(region):
    head = region.head
    a, b = region.hosts[1], region.hosts[2]
    out = head.dir / "gw-stream.txt"
    body = json.dumps({"model": TINY_MODEL, "prompt": "Once", "max_tokens": 600, "min_tokens": 600,
                       "ignore_eos": True, "stream": True})
    stream = head.spawn(["curl", "-sN", "-D", str(head.dir / "gw-stream.headers"), "--max-time", "300", "-H",
                         "Content-Type: application/json", "-H", f"Authorization: Bearer {region.key}", "-d", body,
                         f"{GATEWAY}/v1/completions", "-o", str(out)], "gw-stream.log")
    wait_for(lambda: out.exists() and out.stat().st_size > 0, 120, "the stream to begin", interval=0.2)
    serving = (head.dir / "gw-stream.headers").read_text().lower().split("x-garage-node:")[1].split()[0]
    drained, other = (a, b) if serving == a.name else (b, a)
    drained.run(drained.cmd("drain"))
    wait_for(lambda: models(head, region.key).get(TINY_MODEL) == 1, 30, "the table to drop the draining PC")
    results = load(head, region.key, "--requests", "6", "--concurrency", "2", "--max-tokens", "2")
    assert {r["node"] for r in results} == {other.name} and all(r["status"] == 200 for r in results)
    assert stream.wait(timeout=300) == 0
    text = out.read_text()
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    drained.run(drained.cmd("resume"))
    healthy(drained)
    wait_for(lambda: models(head, region.key).get(TINY_MODEL) == 2, 60, "the PC back in the table")


def served_by(head, region) -> dict[str, int]:
    """Requests answered so far in gw-load.log, per PC."""
    counts = {pc.name: 0 for pc in region.hosts[1:]}
    log = head.dir / "gw-load.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("{") and line.endswith("}"):
            r = json.loads(line)
            if r["status"] == 200 and r["node"] in counts:
                counts[r["node"]] += 1
    return counts


def gateway_view(head, pcs=()) -> str:
    """What the gateway thought, for a failure's message: its table and the PCs it passed over
    (and what each PC's engine said last)."""
    metrics = [line for line in curl(head, METRICS).stdout.splitlines()
               if line.startswith(("garage_gateway_inflight", "garage_gateway_endpoints", "garage_node_engine_state"))
               and not line.rstrip().endswith(" 0.0")]
    passed_over = [line for line in (head.dir / "head.log").read_text().splitlines() if "could not take" in line]
    engines = []
    for pc in pcs:
        res = pc.docker("logs", "--tail", "12", "garage-engine", check=False)
        top = pc.docker("top", "garage-engine", "-o", "pid,pcpu,nlwp,psr,args", check=False)
        engines += [f"{pc.name} engine log:", *(res.stdout + res.stderr).splitlines(), f"{pc.name} engine processes:",
                    *[line[:160] for line in top.stdout.splitlines()]]
    return "\n".join(["gateway metrics:", *metrics, "PCs passed over:", *passed_over[-10:], *engines])


def test_a_pc_dying_under_load_fails_no_request_that_had_not_begun(region):
    head = region.head
    victim = region.hosts[2]
    gen = head.spawn([sys.executable, str(ROOT / "testing/loadgen.py"), GATEWAY, region.key, TINY_MODEL,
                      "--seconds", "30", "--concurrency", "4", "--max-tokens", "16", "--unique"], "gw-load.log")
    # Both PCs take part before one dies. Not a fixed sleep: a PC the gateway failed to reach
    # a moment ago is suspended for 10 s (the table's circuit breaker), so the wait covers one.
    try:
        wait_for(lambda: all(n >= 3 for n in served_by(head, region).values()), 12, "both PCs to answer requests")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {served_by(head, region)}\n{gateway_view(head, region.hosts[1:])}") from None
    # The PC dies: its agent is killed (no more heartbeats) and its engine with it.
    victim.stop(signal.SIGKILL)
    victim.docker("rm", "-f", "garage-engine", check=False)
    assert gen.wait(timeout=200) == 0
    results = [json.loads(line) for line in (head.dir / "gw-load.log").read_text().splitlines() if line.startswith("{")]
    assert len(results) > 10
    failed = [r for r in results if r["status"] != 200]
    assert failed == [], failed  # non-streaming: none had begun, so each went on to the other PC
    text = curl(head, METRICS).stdout
    retries = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "garage_gateway_retries_total"]
    assert sum(s.value for s in retries) >= 1
    # Until its heartbeats are stale, the table still lists it; then the gateway no longer offers it.
    wait_for(lambda: models(head, region.key).get(TINY_MODEL) == 1, 30, "the table to drop the dead PC")
    victim.start()  # power back on: it rejoins and serves again
    healthy(victim)
    wait_for(lambda: models(head, region.key).get(TINY_MODEL) == 2, 60, "the PC back in the table")
