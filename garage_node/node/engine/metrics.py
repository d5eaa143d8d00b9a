"""vLLM's Prometheus metrics, read for status, drain and (later) routing."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Metrics:
    running: int
    waiting: int
    generation_tokens_total: float
    kv_cache_usage_pct: float | None = None  # 0-100; None from an engine that does not say


# vLLM 0.10+ names the KV-cache gauge kv_cache_usage_perc; older releases gpu_cache_usage_perc
# (both a fraction of 1, despite the name).
KV_CACHE_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_metrics(text: str) -> Metrics:
    """vLLM's Prometheus metrics, summed over its label sets (one per served model)."""
    values = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0, "vllm:generation_tokens": 0.0}
    kv: float | None = None
    for family in text_string_to_metric_families(text):
        if family.name in values:
            values[family.name] += sum(s.value for s in family.samples if not s.name.endswith("_created"))
        elif family.name in KV_CACHE_GAUGES and family.samples and kv is None:
            kv = max(s.value for s in family.samples)
    return Metrics(int(values["vllm:num_requests_running"]), int(values["vllm:num_requests_waiting"]),
                   values["vllm:generation_tokens"],
                   round(min(max(kv * 100.0, 0.0), 100.0), 1) if kv is not None else None)
