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


# -- what a starting engine waits for (issue #23: 262 s of a bare "starting" after a power cut)

# vLLM 0.32's own lines, in the order one start of the CPU image logged them (abridged).
VLLM_START = [
    "(APIServer pid=1) INFO 12-06 09:10:25 [api_utils.py:286] non-default args: {'host': '0.0.0.0'}",
    "(APIServer pid=1) WARNING 12-06 09:10:25 [vllm.py:1703] Enforce eager set, disabling torch.compile, CUDAGraphs",
    "(APIServer pid=1) INFO 12-06 09:10:25 [compilation.py:317] Enabled custom fusions: norm_quant, act_quant",
    "(EngineCore pid=18) INFO 12-06 09:10:32 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: ...",
    "(Worker pid=30) INFO 12-06 09:10:41 [cpu_model_runner.py:68] Starting to load model /models/served...",
    "(EngineCore pid=18) INFO 12-06 09:10:41 [utils.py:347] Using LBHNC KV cache layout.",
    "(APIServer pid=1) INFO 12-06 09:10:42 [entry.py:136] Supported tasks: ['generate']",
    "(APIServer pid=1) INFO 12-06 09:10:42 [entry.py:140] Starting vLLM server on http://0.0.0.0:8000",
]


def test_each_stage_of_vllms_start_is_named_and_never_goes_back():
    from garage_node.node.engine.startup import FIRST, stage_of

    seen = [stage_of(VLLM_START[:n]) for n in range(len(VLLM_START) + 1)]
    assert seen == [FIRST, "waiting for its engine core to start", "waiting for its engine core to start",
                    "waiting for its engine core to start", "starting its engine core's workers", "loading weights",
                    "allocating its KV cache and warming up",
                    # the API server's "Supported tasks" comes after the engine core is up: no going back
                    "allocating its KV cache and warming up", "starting its API server"]
    gpu = ["(EngineCore pid=9) INFO [backends.py:548] Using cache directory: /root/.cache/vllm/torch_compile_cache/x "
           "for vLLM's torch.compile", "(EngineCore pid=9) INFO [gpu_model_runner.py:4012] Capturing CUDA graphs: 67/67"]
    assert stage_of(VLLM_START[:5] + gpu[:1]).startswith("compiling")
    assert stage_of(VLLM_START[:5] + gpu) == "capturing CUDA graphs"


class LoggingDocker(FakeDocker):
    """FakeDocker whose container log is what the test writes; remembers the `since` asked for."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.lines: list[str] = []
        self.since: list[int] = []

    def logs(self, name: str, tail: int = 20, since: int = 0) -> list[str]:
        self.since.append(since)
        return self.lines[-tail:]


def test_a_starting_engine_says_what_it_waits_for_and_how_long_its_log_is_silent(tmp_path):
    spec = EngineSpec(image=IMAGE, model="garage/tiny", args=(), bind_ip="100.96.0.2", port=8000, device="cpu",
                      gpu_ids=(), shm_bytes=1 << 20, cache_dir=str(tmp_path / "cache"), model_dir="", env=(),
                      api_key="sk-engine-secret")
    clock, probe, docker = FakeClock(), FakeProbe(), LoggingDocker(images=(IMAGE,))
    m = EngineManager(EngineSection(startup_timeout_s=600), tmp_path / "drain", lambda: (spec, "planned"),
                      docker=docker, probe=probe, clock=clock)
    m.reconcile_safely()  # created and started
    started_wall = clock.time()
    docker.lines = VLLM_START[:3]
    clock.advance(5)
    m.reconcile_safely()
    s = m.snapshot()
    assert s.state is EngineState.STARTING
    assert s.message == "engine starting garage/tiny (5 s): waiting for its engine core to start"
    # Only this start's lines: a restarted container's log holds its earlier runs too.
    assert docker.since[-1] == int(started_wall)
    # The engine core does not come up: after 30 s of silence the message says so, with the
    # last line (and never the engine's key, should a line hold it).
    docker.lines = VLLM_START[:2] + ["(APIServer pid=1) INFO ... api_key=sk-engine-secret"]
    m.reconcile_safely()
    clock.advance(237)
    m.reconcile_safely()
    msg = m.snapshot().message
    assert msg.startswith("engine starting garage/tiny (242 s): waiting for its engine core to start; "
                          "its log has been silent for 237 s (last: ")
    assert "sk-engine-secret" not in msg and "[engine key]" in msg
    docker.lines = VLLM_START[:5]
    m.reconcile_safely()
    assert m.snapshot().message == "engine starting garage/tiny (242 s): loading weights"
    probe.is_ready = True
    m.reconcile_safely()
    assert m.snapshot().state is EngineState.HEALTHY


def test_an_unreadable_metrics_read_makes_the_load_unknown_not_the_last_figures(tmp_path):
    """The gateway takes an engine reporting nothing running for idle; the last figures kept
    after /metrics failed could say so of an engine busy with a request."""
    m, probe, clock = manager(tmp_path)
    m.reconcile_safely()
    probe.is_ready = True
    probe.current = Metrics(running=0, waiting=0, generation_tokens_total=100.0, kv_cache_usage_pct=1.0)
    m.reconcile_safely()
    assert (m.snapshot().requests_running, m.snapshot().requests_waiting) == (0, 0)
    probe.current = None  # /metrics fails (timeout, restart of the server) while /health answers
    clock.advance(2)
    m.reconcile_safely()
    s = m.snapshot()
    assert s.state is EngineState.HEALTHY
    assert (s.requests_running, s.requests_waiting, s.kv_cache_usage_pct, s.generation_tokens_per_s) == (None,) * 4
    r = EngineReport.of(s)
    assert (r.requests_running, r.requests_waiting) == (None, None)
