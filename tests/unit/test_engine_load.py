"""The engine's load, from its /metrics to the status and the head's report, through the one
mapping (manager.Load, EngineReport.of); cleared when the engine stops."""

from __future__ import annotations

from garage_node.core.wire import EngineReport, EngineState
from garage_node.node.config import EngineSection
from garage_node.node.engine.manager import EngineManager
from garage_node.node.engine.metrics import Metrics
from garage_node.node.engine.spec import EngineSpec
from testing.fakes import FakeClock, FakeDocker, FakeProbe

IMAGE = "vllm/vllm-openai:v0.32.0"


def manager(tmp_path):
    spec = EngineSpec(image=IMAGE, model="garage/tiny", args=(), bind_ip="100.96.0.2", port=8000, device="cpu",
                      gpu_ids=(), shm_bytes=1 << 20, cache_dir=str(tmp_path / "cache"), model_dir="", env=())
    clock, probe = FakeClock(), FakeProbe()
    m = EngineManager(EngineSection(drain_grace_s=1.0), tmp_path / "drain", lambda: (spec, "planned"),
                      docker=FakeDocker(images=(IMAGE,)), probe=probe, clock=clock)
    return m, probe, clock


def test_the_load_reaches_the_status_and_the_report_and_a_drain_clears_it(tmp_path):
    m, probe, clock = manager(tmp_path)
    m.reconcile_safely()
    probe.is_ready = True
    probe.current = Metrics(running=3, waiting=1, generation_tokens_total=100.0, kv_cache_usage_pct=40.0)
    m.reconcile_safely()
    clock.advance(10)
    probe.current = Metrics(running=2, waiting=0, generation_tokens_total=600.0, kv_cache_usage_pct=35.5)
    m.reconcile_safely()
    s = m.snapshot()
    assert s.state is EngineState.HEALTHY and s.model == "garage/tiny" and s.plan == "planned"
    assert (s.requests_running, s.requests_waiting, s.kv_cache_usage_pct, s.generation_tokens_per_s) == (2, 0, 35.5, 50.0)
    r = EngineReport.of(s)
    assert (r.requests_running, r.requests_waiting, r.kv_cache_usage_pct, r.generation_tokens_per_s) == (2, 0, 35.5, 50.0)

    probe.current = Metrics(running=0, waiting=0, generation_tokens_total=600.0)
    m.drain()
    m.reconcile_safely()
    s = m.snapshot()
    assert s.state is EngineState.DRAINED and s.draining and s.container_id is None
    # A stopped engine has no load, its last tokens/s included.
    assert (s.requests_running, s.requests_waiting, s.kv_cache_usage_pct, s.generation_tokens_per_s) == (None,) * 4
