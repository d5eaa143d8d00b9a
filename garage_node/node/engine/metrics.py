"""vLLM's Prometheus metrics, read for status, drain and (later) routing."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Metrics:
    running: int
    waiting: int
    generation_tokens_total: float


def parse_metrics(text: str) -> Metrics:
    """vLLM's Prometheus metrics, summed over its label sets (one per served model)."""
    values = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0, "vllm:generation_tokens": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in values:
            values[family.name] += sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return Metrics(int(values["vllm:num_requests_running"]), int(values["vllm:num_requests_waiting"]),
                   values["vllm:generation_tokens"])
