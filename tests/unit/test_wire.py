"""core/wire.py: the contracts both validators read, and the one mapping from a node's status to
what it reports to the head."""

from __future__ import annotations

import dataclasses
import typing

import annotated_types as at
import msgspec
import pydantic
import pytest

from garage_node.core import wire
from garage_node.core.wire import WireError, decode


def bounded_aliases() -> dict[str, object]:
    """Every module-level `Annotated[...]` alias of wire.py that carries a msgspec bound."""
    found = {}
    for name, value in vars(wire).items():
        if typing.get_origin(value) is typing.Annotated and any(
                isinstance(m, msgspec.Meta) for m in value.__metadata__):
            found[name] = value
    return found


def test_the_aliases_are_found():
    assert {"ShortText", "Message", "Percent", "GpuIndex", "WallTime"} <= set(bounded_aliases())


@pytest.mark.parametrize("name", sorted(bounded_aliases()))
def test_each_bound_is_enforced_by_msgspec_and_pydantic_alike(name):
    alias = bounded_aliases()[name]
    meta = next(m for m in alias.__metadata__ if isinstance(m, msgspec.Meta))
    base = typing.get_args(alias)[0]
    if meta.max_length is not None:
        inside, outside = ["x" * meta.max_length], ["x" * (meta.max_length + 1)]
    else:
        lo, hi = meta.ge, meta.le
        step = 1 if base is int else 0.5
        inside = [base(lo), base(hi)]
        outside = [base(lo - step), base(hi + step)]
        if base is float:
            outside += [float("nan"), float("inf")]
    adapter = pydantic.TypeAdapter(alias)
    for v in inside:
        assert msgspec.convert(v, alias) == v
        assert adapter.validate_python(v) == v
    for v in outside:
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(v, alias)
        with pytest.raises(pydantic.ValidationError):
            adapter.validate_python(v)


@pytest.mark.parametrize("name", sorted(bounded_aliases()))
def test_both_validators_read_the_same_numbers(name):
    meta = next(m for m in bounded_aliases()[name].__metadata__ if isinstance(m, msgspec.Meta))
    other = [m for m in bounded_aliases()[name].__metadata__ if not isinstance(m, msgspec.Meta)]
    (grouped,) = other
    if isinstance(grouped, at.MaxLen):
        assert grouped.max_length == meta.max_length
    else:
        assert isinstance(grouped, at.Interval) and (grouped.ge, grouped.le) == (meta.ge, meta.le)


def test_a_report_out_of_bounds_is_refused_by_msgspec():
    report = wire.encode(sample_report())
    report["engine"]["kv_cache_usage_pct"] = 101.0
    with pytest.raises(WireError, match="kv_cache_usage_pct"):
        decode(report, wire.NodeReport)


# ---------------------------------------------------------------- NodeReport.of


def sample_engine(**over) -> wire.EngineStatus:
    """An EngineStatus with every field set to something that is not its default."""
    values = dict(state=wire.EngineState.HEALTHY, message="serving", image="vllm/vllm-openai:v0.32",
                  model="Qwen/Qwen2.5-0.5B", endpoint="http://100.96.0.2:8000", container_id="c0ffee",
                  healthy_since=1.7e9, restarts=2, requests_running=3, requests_waiting=4,
                  generation_tokens_per_s=55.5, last_log_lines=["a line"], plan="fits in 8 GiB", draining=False,
                  kv_cache_usage_pct=12.5, paused=None)
    values.update(over)
    return wire.EngineStatus(**values)


def sample_status(**over) -> wire.Status:
    gpu = wire.GPU(index=0, name="RTX 4090", uuid="GPU-1", memory_total_mib=24564, memory_free_mib=20000,
                   compute_capability="8.9", temperature_c=50, power_w=100.0, utilization_pct=10)
    values = dict(
        state=wire.NodeState.JOINED, message="joined", node_id="n0123456789", name="pc", region="eu",
        gpus=[gpu], gpu_note="one note", driver_version="535.1", cuda_version="12.2",
        overlay=wire.OverlayStatus(interface="gn0", up=True), head=wire.HeadStatus(),
        ray=wire.RayStatus(state=wire.RayState.ALIVE, pid=42),
        engine=sample_engine(),
        versions=wire.AgentVersions(agent="0.1.0", ray="2.60.0", python="3.11"),
        last_error=None, agent=wire.AgentInfo(pid=1, uptime_s=2.0),
        serving=wire.ServingStatus(serving=True, max_temp_c=85),
        placement=wire.PlacementFacts(device="gpu", weights_held=["qwen2.5-7b"], assignment_generation=3),
        update=wire.UpdateStatus(os_version="2026.12.1", blessed=True, policy="window"),
    )
    values.update(over)
    return wire.Status(**values)


def sample_report() -> wire.NodeReport:
    return wire.NodeReport.of(sample_status())


def test_every_engine_report_field_is_carried_from_the_engine_status():
    status = sample_engine()
    report = wire.EngineReport.of(status)
    status_fields = {f.name for f in dataclasses.fields(wire.EngineStatus)}
    for f in dataclasses.fields(wire.EngineReport):
        # A report field the status lacks would need its own source in EngineReport.of.
        assert f.name in status_fields, f"EngineReport.{f.name} has no EngineStatus field to come from"
        assert getattr(status, f.name) is not None
        assert getattr(report, f.name) is not None, f"EngineReport.of drops {f.name}"
        if f.name != "draining":
            assert getattr(report, f.name) == getattr(status, f.name)


def test_every_node_report_field_is_carried_from_the_status():
    status = sample_status()
    report = wire.NodeReport.of(status)
    for f in dataclasses.fields(wire.NodeReport):
        assert getattr(report, f.name) is not None, f"NodeReport.of drops {f.name}"
        if f.name not in ("engine",):
            assert getattr(report, f.name) == getattr(status, f.name), f.name


def test_a_paused_engine_is_reported_draining_so_the_gateway_sends_it_nothing():
    assert wire.EngineReport.of(sample_engine(draining=False, paused="outside serving hours")).draining is True
    assert wire.EngineReport.of(sample_engine(draining=True, paused=None)).draining is True
    assert wire.EngineReport.of(sample_engine(draining=False, paused=None)).draining is False
    assert wire.EngineReport.of(sample_engine(draining=None, paused=None)).draining is False


def test_the_report_stays_inside_the_bounds_the_head_checks():
    long = "x" * 5000
    gpu = dataclasses.replace(sample_status().gpus[0], error=long)
    status = sample_status(message=long, gpu_note=long, gpus=[gpu] * (wire.MAX_GPUS + 3),
                           engine=sample_engine(model="m" * 1000, endpoint="e" * 1000))
    report = wire.NodeReport.of(status)
    assert len(report.message) == len(report.gpu_note or "") == wire.MESSAGE_MAX
    assert len(report.gpus) == wire.MAX_GPUS and all(len(g.error or "") == wire.MESSAGE_MAX for g in report.gpus)
    decode(wire.encode(report), wire.NodeReport)  # msgspec accepts it
    pydantic.TypeAdapter(wire.NodeReport).validate_python(wire.encode(report))  # and so does the head


def test_a_status_without_versions_cannot_be_reported():
    with pytest.raises(ValueError, match="versions"):
        wire.NodeReport.of(sample_status(versions=None))


def test_the_engine_load_names_engine_status_fields():
    from garage_node.node.engine.manager import Load
    from garage_node.node.engine.metrics import Metrics

    load = Load.of(Metrics(running=1, waiting=2, generation_tokens_total=3.0, kv_cache_usage_pct=4.0), 5.04)
    status = dataclasses.replace(wire.EngineStatus(state=wire.EngineState.HEALTHY), **dataclasses.asdict(load))
    assert (status.requests_running, status.requests_waiting, status.kv_cache_usage_pct,
            status.generation_tokens_per_s) == (1, 2, 4.0, 5.0)
    # No engine, no load: every field back to "not measured".
    idle = dataclasses.replace(status, **dataclasses.asdict(Load()))
    assert all(getattr(idle, f.name) is None for f in dataclasses.fields(Load))
