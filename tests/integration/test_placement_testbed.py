"""The head decides what each PC serves, on the real parts (issue #18): the real head (placement
loop, gateway, model store), two PCs in namespaces each with a dockerd of its own serving the
real vLLM CPU image, and two tiny models A and B made locally (distinct names and files),
imported into the region's catalog and stored at the head.

With A in the region's catalog and demand on A only, both PCs serve A. Then the operator adds B
(`head model add`) and a load of requests for B starts: one PC serves B (its weights fetched
from the head's store and checked, the engine switched after the head heard of it), and over
the whole run no request fails: requests for A keep being answered by the other PC, requests
for B wait at the gateway and are answered once B is up. How long B took is printed (the
issue's goal is 120 s), not asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing.catalogs import tiny_entries
from testing.dockerd import TEST_IMAGE, engine_toml, tiny_model_dir
from testing.region import Testbed, missing_prerequisite, wait_for

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = "http://127.0.0.1:8080"
A, B = "tiny-a", "tiny-b"

# The catalog entries the operator imports (`head model import`) and the PCs' catalog: the
# tiny test model twice, its catalog name also its served name (what clients ask for).
CATALOG = tiny_entries(A, B)

HEAD_EXTRA = """
[placement]
interval_s = 2.0
moves_per_minute = 6

[gateway]
hold_s = 290.0
"""
# hold_s: the requests for B wait while a PC switches to it; before the containers were
# weighed (ENGINE_CPU_TASKS) the switch took 107-209 s on the 2-core test machine, and once
# 280 s (CI, with the VM's CPU stolen by its host: held requests then timed out at 240). Kept
# below the load client's 300 s read timeout (testing/loadgen.py).

# Each PC's containers weigh as this many busy tasks against the testbed's processes. With the
# loads paced (PAUSE_S) they still starved B's starting engine once in CI (still "starting
# Python and vLLM" after 480 s, at 764f7c0). Weighed, B was served 23-35 s after its load
# began (9 runs here).
ENGINE_CPU_TASKS = 8
# A vLLM start that hangs is replaced by the agent after this long. The test machine's kernel
# (6.18) now and then leaves a process runnable and never runs it: 2 runs in 11 here, the
# engine core's process "R" for 8 minutes on an idle CPU, with its log silent; moved to the
# other CPU by hand, it ran at once. The agent's own remedy for an engine that never becomes
# healthy, a new start, is what a PC would do as well. 180 s: 5x the slowest start weighed.
STARTUP_TIMEOUT_S = 180


def _engine_missing() -> str | None:
    if why := missing_prerequisite():
        return why
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no running dockerd (image/engine/ensure-dockerd.sh starts one)"
    if subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True).returncode != 0:
        return f"image {TEST_IMAGE} not built (image/engine/build-vllm-cpu-image.sh)"
    return None


pytestmark = [pytest.mark.testbed, pytest.mark.engine,
              pytest.mark.skipif(bool(_engine_missing()), reason=str(_engine_missing()))]


def model_variant(base: Path, out: Path, salt: str) -> Path:
    """The tiny model's files with its config changed harmlessly, so the two models' files (and
    their manifests' digests) differ."""
    shutil.copytree(base, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["garage_test_variant"] = salt
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def engine_section(pc_dir: Path, catalog: Path, cpus: str) -> str:
    """The CPU engine of testing.dockerd.engine_toml without its pinned model (a pin means
    "only this model": the head could assign nothing else) and without a model directory (the
    weights come from the head's store)."""
    body = engine_toml(Path("/nonexistent"), cpus=cpus, startup_timeout_s=str(STARTUP_TIMEOUT_S))
    kept = [line for line in body.splitlines() if not line.startswith(("model = ", "model_dir = "))]
    return "\n".join(kept + [f'catalog = "{catalog}"', f'weights_dir = "{pc_dir / "weights"}"']) + "\n"


def hc(head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return head.cli("head", *args, "--config", str(head.config), timeout=timeout)


def serving(pc) -> str | None:
    """The model a PC's engine serves to the gateway now (healthy, not draining), else None."""
    try:
        s = pc.status()
    except Exception:
        return None
    e = s["engine"]
    return e["model"] if e["state"] == "healthy" and not e["draining"] else None


def stuck(pcs) -> str:
    """Each PC's engine and placement as its status says, and its agent's last lines: what a
    timed-out switch needs in the report (the testbed's files are gone once the test ends)."""
    out = []
    for pc in pcs:
        try:
            s = pc.status()
            out.append(f"{pc.name}: engine {json.dumps(s['engine'])[:1500]}")
            out.append(f"{pc.name}: placement {json.dumps(s['placement'])} problems {json.dumps(s['problems'])[:800]}")
        except Exception as e:  # noqa: BLE001 - a report, whatever the PC says
            out.append(f"{pc.name}: no status ({e})")
        out += [f"{pc.name}: {line}" for line in pc.log_tail("agent.log", 120).splitlines()[-60:]]
    return "\n".join(out)


def b_marks(pcs, since: float, timeout: float) -> dict[str, float]:
    """Seconds from `since` until a PC was assigned B, reported switching to it, and served it."""
    marks: dict[str, float] = {}
    deadline = since + timeout
    while "serving" not in marks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no PC served {B} within {timeout:.0f} s (so far: {marks})\n{stuck(pcs)}")
        for pc in pcs:
            try:
                s = pc.status()
            except Exception:
                continue
            now = time.monotonic() - since
            if (s["assignment"] or {}).get("model") == B:
                marks.setdefault("assigned", now)
            if (s["placement"] or {}).get("switching_to") == B:
                marks.setdefault("switching", now)
            if serving(pc) == B:
                marks.setdefault("serving", now)
        time.sleep(0.5)
    return marks


def evidence(tb: Testbed, pc) -> str:
    """What a failure report needs: the PCs' switch lines, the head's placement lines, and the
    moved PC's engine asked directly."""
    lines = []
    for host in tb.hosts[1:]:
        lines += [f"{host.name}: {line}" for line in host.log_tail("agent.log", 400).splitlines()
                  if "assign" in line or "engine " in line]
    lines += [line for line in tb.head.log_tail("head.log", 400).splitlines() if "placement:" in line]
    s = pc.status()
    body = json.dumps({"model": B, "prompt": "Hello", "max_tokens": 4})
    direct = pc.run(["curl", "-s", "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {pc.engine_key()}",
                     "-d", body, f"{s['engine']['endpoint']}/v1/completions"], check=False).stdout
    return "\n".join(lines[-60:] + [f"direct to {pc.name}: {direct[:600]}"])


def gateway_status(head, key: str, model: str) -> str:
    """The HTTP status of a completion for `model` within 2 s ("000": none yet, e.g. held)."""
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1})
    return head.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", "-H",
                     "Content-Type: application/json", "-H", f"Authorization: Bearer {key}", "-d", body,
                     f"{GATEWAY}/v1/completions"], check=False).stdout.strip()


# Each client waits this long between its requests. Sent back to back (about 20 a second
# through the gateway and wireguard-go), the load took both cores of the test machine, and the
# engine starting for B (one process in a cgroup of its own, weighed as one task against every
# runnable thread of the head, the load and the hubs) got 8 s of CPU in 8 minutes: on real PCs
# each engine has a machine of its own. A steady few requests a second prove the same thing.
PAUSE_S = 0.2


def start_load(head, key: str, model: str, name: str, concurrency: int):
    return head.spawn([sys.executable, str(ROOT / "testing/loadgen.py"), GATEWAY, key, model,
                       "--concurrency", str(concurrency), "--seconds", "3600", "--max-tokens", "4", "--unique",
                       "--pause", str(PAUSE_S)],
                      f"load-{name}.log")


def results(head, name: str) -> list[dict]:
    text = (head.dir / f"load-{name}.log").read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def region(testbed: Testbed, tmp_path_factory) -> Testbed:
    tb = testbed
    work = tmp_path_factory.mktemp("placement")
    base = tiny_model_dir()
    dirs = {A: model_variant(base, work / A, "a"), B: model_variant(base, work / B, "b")}
    catalog = tb.dir / "tiny-catalog.toml"
    catalog.write_text(CATALOG)
    catalog.chmod(0o644)
    head = tb.start_head(extra=HEAD_EXTRA)
    hc(head, "model", "import", str(catalog))
    for name, folder in dirs.items():
        hc(head, "weights", "add", name, str(folder), timeout=120)
    hc(head, "model", "add", A)  # B is added when its load begins (the test)
    tb.key = hc(head, "key", "create", "tester").stdout.strip()
    for i, name in enumerate(("pc-a", "pc-b")):
        pc = tb.add_engine_node(name, engine_section(tb.dir / name, catalog, cpus=str(i)), cpu_tasks=ENGINE_CPU_TASKS)
        pc.configure(head.token())
        pc.start()
    return tb


def test_demand_moves_a_pc_to_another_model_and_no_request_fails(region):
    head, pcs = region.head, region.hosts[1:]
    started = time.monotonic()
    # A alone in the region's catalog, then demand on A only: both PCs serve A.
    wait_for(lambda: any(serving(pc) for pc in pcs), 600, "a PC serving a model the head assigned")
    first = time.monotonic() - started
    load_a = start_load(head, region.key, A, "a", concurrency=1)
    wait_for(lambda: all(serving(pc) == A for pc in pcs), 900, "both PCs serving tiny-a")
    both_on_a = time.monotonic() - started
    for pc in pcs:
        s = pc.status()
        assert s["assignment"]["model"] == A and s["placement"]["assignment_generation"] == s["assignment"]["generation"]
        assert A in s["placement"]["weights_held"]  # fetched from the head's store, checked
        assert "serving tiny-a, assigned by the head" in pc.run(pc.cmd("status")).stdout

    # A load of requests for B starts: one PC moves to B (the goal: within 120 s; a
    # figure printed, not asserted: on this 2-core machine it is mostly vLLM's start on a CPU
    # the other engine's load shares).
    b_started = time.monotonic()
    hc(head, "model", "add", B)
    # The head's placement loop reads the region's catalog every interval_s: until then the
    # gateway answers 404 for B (outside the catalog), after it holds B's requests.
    wait_for(lambda: gateway_status(head, region.key, B) != "404", 30, "the gateway to know tiny-b")
    load_b = start_load(head, region.key, B, "b", concurrency=2)
    marks = b_marks(pcs, b_started, timeout=480)
    took_b = marks["serving"]
    moved = next(pc for pc in pcs if serving(pc) == B)
    stayed = next(pc for pc in pcs if pc is not moved)
    s = moved.status()
    assert B in s["placement"]["weights_held"] and s["placement"]["switching_to"] is None
    assert serving(stayed) == A
    time.sleep(15)  # both loads answered for a while after the switch
    for proc in (load_a, load_b):
        proc.terminate()
        proc.wait(timeout=30)
    a, b = results(head, "a"), results(head, "b")
    failed = [r for r in a + b if r["status"] != 200 or not r["done"]]
    print(f"\nplacement testbed: first engine healthy after {first:.0f} s; both PCs on {A} after {both_on_a:.0f} s; one PC on {B} {took_b:.0f} s after its "
          f"load began (assigned after {marks['assigned']:.0f} s, switching reported after "
          f"{marks.get('switching', float('nan')):.0f} s); {len(a)} requests for {A}, {len(b)} for {B}, {len(failed)} failed; "
          f"longest wait for {B}: {max((r['latency_s'] for r in b), default=0):.0f} s")
    assert a and b and not failed, (failed[:3], evidence(region, moved))
    assert {r["node"] for r in b} and all(r["node"] for r in a + b)
