"""The vLLM engine on real parts: a real dockerd, the locally built vLLM CPU image, a tiny
dummy-weight Llama model, the real agent joined to a real head over WireGuard.

The engine node lives in this machine's own network namespace (where dockerd runs), so Docker
can publish the engine's port on the node's overlay address; the head, in its namespace,
reaches the engine only through the overlay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from garage_node.node.engine.startup import FIRST, STAGES
from testing.nvml_double import RTX_4060
from testing.dockerd import engine_toml, tiny_model_dir
from testing.region import Testbed, missing_prerequisite, wait_for

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("GARAGE_ENGINE_TEST_IMAGE", "garage-node/vllm-cpu:test")
MODEL = "garage/tiny-llama-test"


def _engine_missing() -> str | None:
    if why := missing_prerequisite():
        return why
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no running dockerd (image/engine/ensure-dockerd.sh starts one)"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        return f"image {IMAGE} not built (image/engine/build-vllm-cpu-image.sh)"
    return None


pytestmark = [pytest.mark.engine, pytest.mark.skipif(bool(_engine_missing()), reason=str(_engine_missing()))]


def docker(*args: str, check: bool = True) -> str:
    res = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {res.stderr}")
    return res.stdout.strip()


def engine_section(model_dir: Path, cache: Path, **over: str) -> str:
    """The engine PCs' section (testing/dockerd.py), with this node's model cache; the
    image is the one this file tests (GARAGE_ENGINE_TEST_IMAGE)."""
    return engine_toml(model_dir, **{"cache_dir": f'"{cache}"', **over})


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return tiny_model_dir(IMAGE)  # made once per image build, shared with the gateway tests


@pytest.fixture(scope="module")
def no_engine_container() -> Iterator[None]:
    """The machine's dockerd holds no garage-engine before the testbed and none after its
    cleanup (set up before `testbed`, so torn down after it)."""
    docker("rm", "-f", "garage-engine", check=False)
    yield
    docker("rm", "-f", "garage-engine", check=False)


@pytest.fixture(scope="module")
def region(tiny_model, tmp_path_factory, no_engine_container: None, testbed: Testbed) -> Testbed:
    tb = testbed
    head = tb.start_head()
    node = tb.add_root_node("e1")
    tb.engine_args = (tiny_model, tmp_path_factory.mktemp("model-cache"))
    node.configure(head.token(), engine=engine_section(*tb.engine_args))
    node.start()
    return tb


def healthy(node, timeout=300, predicate=None):
    def ok(s):
        return s["engine"]["state"] == "healthy" and (predicate is None or predicate(s))
    return node.wait_state("joined", timeout, predicate=ok)


def complete(head, endpoint: str, key: str, prompt: str = "Hello", max_tokens: int = 8) -> dict:
    """Straight to the engine, with its key (what the head's gateway does)."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
    out = head.run(["curl", "-sf", "--max-time", "60", "-H", "Content-Type: application/json",
                    "-H", f"Authorization: Bearer {key}", "-d", body, f"{endpoint}/v1/completions"], timeout=90).stdout
    return json.loads(out)


def test_engine_serves_a_completion_over_the_overlay(region):
    head, node = region.head, region.hosts[1]
    s = healthy(node)
    e = s["engine"]
    assert e["model"] == MODEL and e["endpoint"] == f"http://{s['overlay']['address']}:8000"
    # Published on the overlay address only, never 0.0.0.0.
    bindings = json.loads(docker("inspect", "-f", "{{json .HostConfig.PortBindings}}", "garage-engine"))
    assert bindings == {"8000/tcp": [{"HostIp": s["overlay"]["address"], "HostPort": "8000"}]}
    labels = json.loads(docker("inspect", "-f", "{{json .Config.Labels}}", "garage-engine"))
    assert labels["garage-node.managed"] == "true" and len(labels["garage-node.spec-hash"]) == 16
    reply = complete(head, e["endpoint"], node.engine_key())
    assert reply["model"] == MODEL and reply["choices"][0]["text"]
    # A request asking for logprobs (a customer's, or the audit verifier's prompt_logprobs) is
    # answered, and the engine lives on: vLLM's CPU build once died on it (torch.compile
    # without a compiler; the spec's TORCHDYNAMO_DISABLE=1).
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 2, "logprobs": 2, "prompt_logprobs": 2})
    scored = json.loads(head.run(["curl", "-sf", "--max-time", "60", "-H", "Content-Type: application/json", "-H",
                                  f"Authorization: Bearer {node.engine_key()}", "-d", body,
                                  f"{e['endpoint']}/v1/completions"], timeout=90).stdout)
    assert scored["choices"][0]["prompt_logprobs"][1] and scored["choices"][0]["logprobs"]["top_logprobs"]
    assert complete(head, e["endpoint"], node.engine_key())["choices"][0]["text"]
    # Without the engine's key (what any other PC has), the engine refuses.
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1})
    refused = head.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30", "-H",
                        "Content-Type: application/json", "-d", body, f"{e['endpoint']}/v1/completions"]).stdout
    assert refused == "401"
    assert node.engine_key() not in docker("inspect", "-f", "{{json .Config.Cmd}}", "garage-engine")
    # The head hears which model the node serves and where.
    def head_knows() -> bool:
        row = next(r for r in head.nodes() if r["name"] == "e1")
        return row["engine"]["model"] == MODEL and row["engine"]["endpoint"] == e["endpoint"]
    wait_for(head_knows, 30, "the head to hear the engine's model and endpoint")
    text = node.run(node.cmd("status")).stdout
    assert "healthy" in text and MODEL in text


def test_metrics_reach_status(region):
    head, node = region.head, region.hosts[1]
    endpoint = node.status()["engine"]["endpoint"]
    complete(head, endpoint, node.engine_key(), max_tokens=64)
    s = healthy(node, 30, predicate=lambda s: s["engine"]["generation_tokens_per_s"] is not None)
    assert s["engine"]["requests_running"] == 0 and s["engine"]["requests_waiting"] == 0


def test_killed_engine_comes_back_by_itself(region):
    node = region.hosts[1]
    before = node.status()["engine"]["restarts"]
    docker("kill", "garage-engine")
    said: list[str] = []  # what status said while the engine started again (issue #23)
    t0 = time.monotonic()

    def back() -> bool:
        e = node.status()["engine"]
        if e["state"] == "starting":
            if not said or said[-1].partition("): ")[2] != e["message"].partition("): ")[2]:
                print(f"  {time.monotonic() - t0:5.0f} s after the kill: {e['message']}")  # each new stage, with -s
            said.append(e["message"])
        return e["state"] == "healthy" and e["restarts"] > before
    wait_for(back, 300, "the killed engine to be healthy again")
    print(f"  {time.monotonic() - t0:5.0f} s  healthy again")
    s = healthy(node, 30)
    assert s["engine"]["restarts"] == before + 1
    # The stages vLLM went through were named from its log, not a bare "loading".
    named = {stage for _, stage in STAGES if any(stage in m for m in said)}
    assert named - {FIRST}, said
    assert all(m.startswith("engine starting ") or m == "engine restarted after a crash" for m in said), said


def test_agent_crash_adopts_the_running_engine(region):
    node = region.hosts[1]
    cid = node.status()["engine"]["container_id"]
    node.stop(signal.SIGKILL)  # a crash: no drain, the container keeps running
    assert docker("inspect", "-f", "{{.State.Running}}", "garage-engine") == "true"
    node.start()
    s = healthy(node, 120)
    assert s["engine"]["container_id"] == cid
    assert docker("inspect", "-f", "{{.Id}}", "garage-engine") == cid


def test_spec_change_replaces_the_engine(region):
    node = region.hosts[1]
    old_id = node.status()["engine"]["container_id"]
    old_hash = docker("inspect", "-f", '{{index .Config.Labels "garage-node.spec-hash"}}', "garage-engine")
    node.stop(signal.SIGKILL)
    model_dir, cache = region.engine_args
    node.configure("", engine=engine_section(model_dir, cache, max_model_len="1024"))
    node.start()
    healthy(node, 300, predicate=lambda s: s["engine"]["container_id"] not in (None, old_id))
    new_hash = docker("inspect", "-f", '{{index .Config.Labels "garage-node.spec-hash"}}', "garage-engine")
    assert new_hash != old_hash
    assert "--max-model-len 1024" in " ".join(json.loads(docker("inspect", "-f", "{{json .Config.Cmd}}", "garage-engine")))


def test_drain_lets_a_streaming_request_finish(region):
    head, node = region.head, region.hosts[1]
    endpoint = healthy(node)["engine"]["endpoint"]
    body = json.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 900, "stream": True,
                       "ignore_eos": True, "min_tokens": 900})
    out = head.dir / "stream.txt"
    stream = head.spawn(["curl", "-sN", "--max-time", "240", "-H", "Content-Type: application/json",
                         "-H", f"Authorization: Bearer {node.engine_key()}", "-d", body, f"{endpoint}/v1/completions", "-o", str(out)], "stream.log")
    wait_for(lambda: out.exists() and out.stat().st_size > 0, 60, "the stream to begin", interval=0.1)
    node.run(node.cmd("drain"))
    s = node.wait_state("joined", 240, predicate=lambda s: s["engine"]["state"] == "drained")
    assert stream.wait(timeout=60) == 0
    text = out.read_text()
    assert text.rstrip().endswith("data: [DONE]")
    last = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")][-1]
    assert last["choices"][0]["finish_reason"] == "length"  # the request ran to its end
    assert s["engine"]["draining"] is True
    assert docker("ps", "-q", "--filter", "name=^garage-engine$") == ""
    # The drain holds across an agent restart.
    assert node.stop(signal.SIGTERM) == 0
    node.start()
    time.sleep(5)
    s = node.wait_state("joined", 120)
    assert s["engine"]["state"] == "drained" and docker("ps", "-q", "--filter", "name=^garage-engine$") == ""
    node.run(node.cmd("resume"))
    healthy(node, 300)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_node(region):
    node = region.add_node("eb", [RTX_4060])
    return node


def _engine_state(region, node, engine: str, want: str, timeout=120) -> dict:
    # Both nodes share this machine's dockerd: a name of its own keeps e1's engine out of reach.
    node.configure(region.head.token(), engine=engine + 'container_name = "garage-engine-eb"\n')
    node.start()
    try:
        s = node.wait_state("joined", timeout, predicate=lambda s: s["engine"]["state"] == want)
        assert node.proc.poll() is None  # the agent keeps running
        return s
    finally:
        node.stop()
        for f in ("identity.json", "head-ca.pem"):  # the next case enrolls afresh
            (node.state_dir / f).unlink(missing_ok=True)


def test_image_that_does_not_exist(region, bad_node):
    model_dir, cache = region.engine_args
    # A registry on loopback that is not there: the pull fails at once and sends nothing out.
    eng = engine_section(model_dir, cache, image='"127.0.0.1:5999/garage/missing:1"')
    s = _engine_state(region, bad_node, eng, "error")
    assert "127.0.0.1:5999/garage/missing:1" in s["engine"]["message"] and "could not be pulled" in s["engine"]["message"]


def test_docker_daemon_down(region, bad_node):
    model_dir, cache = region.engine_args
    eng = engine_section(model_dir, cache, docker_socket='"/run/garage-test-no-docker.sock"')
    s = _engine_state(region, bad_node, eng, "error")
    assert "Docker is not reachable" in s["engine"]["message"]


def test_model_that_does_not_fit(region, bad_node):
    eng = 'enabled = true\ndevice = "gpu"\nmodel = "qwen2.5-32b"\nimage = "127.0.0.1:5999/never:1"\n'
    s = _engine_state(region, bad_node, eng, "refused")
    msg = s["engine"]["message"]
    assert "GiB" in msg and "would fit instead" in msg


def test_corrupt_catalog_entry(region, bad_node, tmp_path):
    catalog = tmp_path / "models.toml"
    catalog.write_text('[models.broken]\nid = "x/broken"\nparameters = "lots"\n')
    eng = f'enabled = true\ndevice = "gpu"\ncatalog = "{catalog}"\n'
    s = _engine_state(region, bad_node, eng, "refused")
    msg = s["engine"]["message"]
    assert str(catalog) in msg and "parameters" in msg
