"""Two PCs, each serving the real vLLM CPU image, joined to one real head.

Each engine PC is an ordinary testbed node in its own network namespace with a dockerd of its
own inside that namespace (testing/dockerd.py), so each publishes its engine's port 8000 on its
own overlay address, as real PCs do. The head reaches both engines through the overlay; one PC
cannot reach the other's engine (the hub forwards only Ray's ports and ping between nodes); a
killed engine on one PC leaves the other serving, and comes back by itself.

Run alone on a small machine: two vLLM engines take ~3 GB of memory each and both CPUs while
they start. `pytest -s` prints the measured load, start and healthy times and each engine's RSS.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from testing.dockerd import CACHE, TEST_IMAGE, TINY_MODEL, cgroup_dirs, engine_toml, tiny_model_dir
from testing.region import Testbed, missing_prerequisite, namespaces, wait_for


def _engine_missing() -> str | None:
    if why := missing_prerequisite():
        return why
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no running dockerd (image/engine/ensure-dockerd.sh starts one)"
    if subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True).returncode != 0:
        return f"image {TEST_IMAGE} not built (image/engine/build-vllm-cpu-image.sh)"
    return None


pytestmark = [pytest.mark.engine, pytest.mark.skipif(bool(_engine_missing()), reason=str(_engine_missing()))]

FIGURES: dict[str, str] = {}


def healthy(node, timeout=600, predicate=None) -> dict:
    def ok(s):
        return s["engine"]["state"] == "healthy" and (predicate is None or predicate(s))
    return node.wait_state("joined", timeout, predicate=ok)


def auth(pc) -> list[str]:
    """curl arguments with the key this PC's engine demands, where the head gave it one."""
    key = json.loads((pc.state_dir / "identity.json").read_text()).get("engine_api_key")
    return ["-H", f"Authorization: Bearer {key}"] if key else []


def complete(head, pc, endpoint: str, prompt: str = "Hello", max_tokens: int = 8) -> dict:
    body = json.dumps({"model": TINY_MODEL, "prompt": prompt, "max_tokens": max_tokens})
    out = head.run(["curl", "-sf", "--max-time", "60", "-H", "Content-Type: application/json", *auth(pc),
                    "-d", body, f"{endpoint}/v1/completions"], timeout=90).stdout
    return json.loads(out)


def models(head, pc, endpoint: str) -> list[str]:
    out = head.run(["curl", "-sf", "--max-time", "30", *auth(pc), f"{endpoint}/v1/models"]).stdout
    return [m["id"] for m in json.loads(out)["data"]]


@pytest.fixture(scope="module")
def region():
    model = tiny_model_dir()
    tb = Testbed()
    tb.setup()
    try:
        head = tb.start_head()
        pcs = [tb.add_engine_node(name, engine_toml(model)) for name in ("pa", "pb")]
        for pc in pcs:
            t = pc.dockerd.timings
            FIGURES[f"{pc.name} dockerd start"] = f"{t['start_s']:.2f} s"
            FIGURES[f"{pc.name} image load"] = f"{t['load_s']:.1f} s" if "load_s" in t else "cached (no load)"
            pc.configure(head.token())
        t0 = time.monotonic()
        for pc in pcs:
            pc.start()
        for pc in pcs:
            healthy(pc)
            FIGURES[f"{pc.name} engine healthy after agent start"] = f"{time.monotonic() - t0:.1f} s"
        yield tb
    finally:
        slots = [h.dockerd.slot for h in tb.hosts if getattr(h, "dockerd", None) is not None]
        t0 = time.monotonic()
        tb.cleanup()
        FIGURES["testbed cleanup"] = f"{time.monotonic() - t0:.1f} s"
        if FIGURES:
            print("\ntwo engines, measured:\n" + "\n".join(f"  {k}: {v}" for k, v in FIGURES.items()))
        # Nothing left behind: namespaces, the PCs' containers (by cgroup), their mounts.
        assert not [ns for ns in namespaces() if ns.startswith(tb.prefix)]
        assert not [s for s in slots if cgroup_dirs(s)]
        assert str(CACHE) not in Path("/proc/mounts").read_text()


def pcs(region):
    return region.hosts[1], region.hosts[2]


def test_head_reaches_both_engines_over_the_overlay(region):
    head = region.head
    endpoints = []
    for pc in pcs(region):
        s = healthy(pc, 60)
        e = s["engine"]
        assert e["endpoint"] == f"http://{s['overlay']['address']}:8000"
        endpoints.append(e["endpoint"])
        # Published on this PC's overlay address only, by this PC's own dockerd.
        bindings = json.loads(pc.docker("inspect", "-f", "{{json .HostConfig.PortBindings}}", "garage-engine").stdout)
        assert bindings == {"8000/tcp": [{"HostIp": s["overlay"]["address"], "HostPort": "8000"}]}
        assert models(head, pc, e["endpoint"]) == [TINY_MODEL]
        reply = complete(head, pc, e["endpoint"])
        assert reply["model"] == TINY_MODEL and reply["choices"][0]["text"]
        mem = pc.engine_memory()
        FIGURES[f"{pc.name} engine memory"] = (f"rss {mem['rss'] / 2**20:.0f} MiB (cgroup, anonymous), "
                                               f"page cache {mem['cache'] / 2**20:.0f} MiB, "
                                               f"sum of VmRSS {mem['rss_sum'] / 2**20:.0f} MiB")
    assert endpoints[0] != endpoints[1]
    # Each container lives in its own PC's dockerd: the machine's dockerd has neither.
    ids = [pc.docker("inspect", "-f", "{{.Id}}", "garage-engine").stdout.strip() for pc in pcs(region)]
    assert ids[0] != ids[1]

    # The head hears which model each PC serves and where.
    def head_knows() -> bool:
        rows = {r["name"]: r for r in head.nodes()}
        return all(rows[pc.name]["engine"]["endpoint"] == ep and rows[pc.name]["engine"]["model"] == TINY_MODEL
                   for pc, ep in zip(pcs(region), endpoints))
    wait_for(head_knows, 60, "the head to hear both engines' model and endpoint")


def test_a_pc_cannot_reach_another_pcs_engine(region):
    a, b = pcs(region)
    b_overlay = b.status()["overlay"]["address"]
    # The overlay path from A to B exists (the hub forwards ping between nodes)...
    a.run(["ping", "-c", "1", "-W", "5", b_overlay])
    # ...but not to B's engine: the hub's forward chain drops node-to-node TCP but Ray's ports.
    res = a.run(["curl", "-s", "--max-time", "5", f"http://{b_overlay}:8000/v1/models"], check=False)
    assert res.returncode != 0, res.stdout
    # Nor on B's address on the shared LAN (published on the overlay address only; B's firewall).
    res = a.run(["curl", "-s", "--max-time", "5", f"http://{b.ip}:8000/v1/models"], check=False)
    assert res.returncode != 0, res.stdout
    # While the head reaches it.
    assert models(region.head, b, f"http://{b_overlay}:8000") == [TINY_MODEL]


def test_killed_engine_leaves_the_other_serving(region):
    head = region.head
    a, b = pcs(region)
    b_endpoint = healthy(b, 60)["engine"]["endpoint"]
    before = a.status()["engine"]["restarts"]
    a.docker("kill", "garage-engine")  # inside A's own dockerd
    # B's engine is untouched and keeps serving.
    assert b.docker("inspect", "-f", "{{.State.Running}}", "garage-engine").stdout.strip() == "true"
    for i in range(3):
        reply = complete(head, b, b_endpoint, prompt=f"Still there {i}")
        assert reply["choices"][0]["text"]
    # A's agent brings its engine back by itself, in its own dockerd.
    s = healthy(a, 600, predicate=lambda s: s["engine"]["restarts"] > before)
    assert complete(head, a, s["engine"]["endpoint"])["choices"][0]["text"]
    assert healthy(b, 60)["engine"]["restarts"] == 0
