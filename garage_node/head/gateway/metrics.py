"""What Prometheus scrapes from the head: the gateway's requests, latencies, tokens and
retries, and — from the PCs' heartbeats — each PC's GPUs and engine, so one scrape of the head
covers the region. A registry of its own (not prometheus_client's global one), so several
gateways in one process (the tests) do not collide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from garage_node.core.wire import EngineState
from garage_node.head.gateway.table import EndpointTable

HEARTBEAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PlacementSource(Protocol):
    """What the metrics read of the head's placement (head/placement.py's PlacementLoop)."""

    last: Any  # the last pass: .decision.models, each with model, demand, wanted, running
    switches: dict[str, int]


class GatewayMetrics:
    def __init__(self, table: EndpointTable, node_names: Callable[[], dict[str, str]],
                 node_tokens: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("garage_gateway_requests", "Requests answered by the gateway",
                                ["model", "key", "status"], registry=r)
        self.ttft = Histogram("garage_gateway_time_to_first_token_seconds",
                              "From the request's arrival to the first byte of the answer", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("garage_gateway_request_seconds", "From the request's arrival to its end",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("garage_gateway_tokens", "Tokens served, by PC, model and kind",
                              ["node", "model", "kind"], registry=r)
        self.retries = Counter("garage_gateway_retries", "Requests sent on to another PC after one failed",
                               ["model"], registry=r)
        self.stream_errors = Counter("garage_gateway_stream_errors",
                                     "Streams ended with an error event after they had begun", ["model"], registry=r)
        self.refused = Counter("garage_gateway_refused", "Requests refused with 503 overloaded (admission.py), by "
                               "bound: in_flight or queue_age", ["reason"], registry=r)
        self.heartbeats = Histogram("garage_head_heartbeat_seconds",
                                    "How long the head took to answer a PC's heartbeat, by HTTP status",
                                    ["status"], buckets=HEARTBEAT_BUCKETS, registry=r)
        r.register(_RegionCollector(table, node_names, node_tokens))
        self._placement = _PlacementCollector()
        r.register(self._placement)
        self._trust = _TrustCollector(node_names)
        r.register(self._trust)
        self._admission = _AdmissionCollector()
        r.register(self._admission)

    def watch_placement(self, source: PlacementSource) -> None:
        """Export the head's placement per model: demand, replicas wanted and running, switches."""
        self._placement.source = source

    def watch_admission(self, source: AdmissionSource) -> None:
        """Export the admission limit's state: limiting or not, its rate, the learnt capacity."""
        self._admission.source = source

    def watch_admission_elsewhere(self, states: Callable[[], Iterable[AdmissionState]]) -> None:
        """Add the admission states of [gateway] workers' processes (workers.py relays them)."""
        self._admission.elsewhere = states

    def watch_trust(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the audits' verdicts: how many PCs are quarantined, and which (`snapshot`:
        head/audit/trust.py's Trust.snapshot, node id -> NodeTrust)."""
        self._trust.snapshot = snapshot


class AdmissionSource(Protocol):
    """What the metrics read of the admission's governor (admission.py's Governor)."""

    limiting: bool
    rate: float
    capacity_rps: float


@dataclass(frozen=True)
class AdmissionState:
    """One process's governor as the metrics sum it (a worker's, relayed to the head)."""

    limiting: bool
    rate: float
    capacity_rps: float

    @classmethod
    def of(cls, g: AdmissionSource) -> AdmissionState:
        return cls(g.limiting, g.rate, g.capacity_rps)


class _AdmissionCollector(Collector):
    """Whether the gateway is shedding load now, at what rate it admits, and what it learnt it
    can complete: summed at scrape time over the head's own governor and the last states its
    [gateway] workers relayed (each process has a governor of its own)."""

    def __init__(self) -> None:
        self.source: AdmissionSource | None = None
        self.elsewhere: Callable[[], Iterable[AdmissionState]] = lambda: ()

    def collect(self) -> Iterable[Metric]:
        states = [AdmissionState.of(self.source)] if self.source is not None else []
        states += list(self.elsewhere())
        limiting = [s for s in states if s.limiting]
        yield GaugeMetricFamily("garage_gateway_admission_limiting", "Gateway processes admitting new requests "
                                "at a rate now (their CPU is spent; the rest get 503 overloaded)",
                                value=float(len(limiting)))
        yield GaugeMetricFamily("garage_gateway_admission_rate", "Requests a second admitted by the processes "
                                "that limit, together (0 when none does)", value=sum(s.rate for s in limiting))
        yield GaugeMetricFamily("garage_gateway_admission_capacity", "Requests a second the processes completed "
                                "while they worked a backlog off in this overload, together (0 before one is "
                                "learnt)", value=sum(s.capacity_rps for s in states if s.capacity_rps != float("inf")))


class _TrustCollector(Collector):
    """The PCs the audits took out (issue #20), read at scrape time from the trust store's
    cached view. Before the gateway's trust store is watched: 0 of each."""

    def __init__(self, node_names: Callable[[], dict[str, str]]) -> None:
        self.node_names = node_names
        self.snapshot: Callable[[], dict[str, Any]] = dict

    def collect(self) -> Iterable[Metric]:
        count = GaugeMetricFamily("garage_audit_quarantined_pcs", "PCs the audits quarantined (no customers' "
                                  "requests, no Ray work, earnings frozen), by state: quarantined, or rechecking "
                                  "(the operator asked for a release)", labels=["state"])
        which = GaugeMetricFamily("garage_node_quarantined", "1 for each PC quarantined by the audits",
                                  labels=["node", "name", "state"])
        trusted = GaugeMetricFamily("garage_audit_trusted_pcs", "PCs the operator marked trusted (verifiers)")
        states = {"quarantined": 0, "rechecking": 0}
        names = self.node_names()
        marks = 0
        for node_id, t in self.snapshot().items():
            marks += bool(t.trusted and t.serves)
            if not t.serves:
                states[t.state] = states.get(t.state, 0) + 1
                which.add_metric([node_id, names.get(node_id, ""), t.state], 1)
        for state, n in states.items():
            count.add_metric([state], n)
        trusted.add_metric([], marks)
        yield from (count, which, trusted)


class _PlacementCollector(Collector):
    def __init__(self) -> None:
        self.source: PlacementSource | None = None

    def collect(self) -> Iterable[Metric]:
        wanted = GaugeMetricFamily("garage_placement_replicas_wanted", "PCs the head wants serving each model",
                                   labels=["model"])
        running = GaugeMetricFamily("garage_placement_replicas_running", "PCs serving each model now",
                                    labels=["model"])
        tokens = GaugeMetricFamily("garage_placement_demand_tokens_per_second",
                                   "Tokens per second requested of each model (the gateway's last 60 s)", labels=["model"])
        queue = GaugeMetricFamily("garage_placement_demand_queue", "Requests open for each model now (in flight "
                                  "and held)", labels=["model"])
        unserved = GaugeMetricFamily("garage_placement_demand_unserved_per_second",
                                     "Requests per second that found no PC for their model", labels=["model"])
        switches = CounterMetricFamily("garage_placement_switches", "Assignments the head changed to each model "
                                       "since it started", labels=["model"])
        source = self.source
        last = source.last if source is not None else None
        for m in (last.decision.models if last is not None and last.decision is not None else []):
            wanted.add_metric([m.model], m.wanted)
            running.add_metric([m.model], m.running)
            tokens.add_metric([m.model], m.demand.tokens_per_s)
            queue.add_metric([m.model], m.demand.queue_depth)
            unserved.add_metric([m.model], m.demand.unserved_per_s)
        for model, n in sorted(dict(source.switches if source is not None else {}).items()):
            switches.add_metric([model], n)
        yield from (wanted, running, tokens, queue, unserved, switches)


class _RegionCollector(Collector):
    """The endpoint table and each PC's last report, read at scrape time."""

    def __init__(self, table: EndpointTable, node_names: Callable[[], dict[str, str]],
                 node_tokens: Callable[[], dict[str, int]]) -> None:
        self.table = table
        self.node_names = node_names
        self.node_tokens = node_tokens

    def collect(self) -> Iterable[Metric]:
        names = self.node_names()
        endpoints = GaugeMetricFamily("garage_gateway_endpoints", "PCs in the endpoint table, by model and state",
                                      labels=["model", "state"])
        inflight = GaugeMetricFamily("garage_gateway_inflight", "Requests the gateway has open on each PC now "
                                     "(the router's measure of load)", labels=["node", "name", "model"])
        counts: dict[tuple[str, str], int] = {}
        now = self.table.clock.monotonic()
        for ep in self.table.snapshot():
            # Suspended: the gateway failed to reach it just now and tries it again shortly.
            # Stale: silent for longer than stale_after_s; its last state is no longer news
            # (the gateway forgets it after FORGET_AFTER_S, /v1/models already leaves it out).
            state = ("stale" if self.table.is_stale(ep, now) else "draining" if ep.draining
                     else "suspended" if now < ep.suspended_until else str(ep.state))
            counts[(ep.model, state)] = counts.get((ep.model, state), 0) + 1
            inflight.add_metric([ep.node_id, names.get(ep.node_id, ""), ep.model], ep.inflight)
        for (model, state), n in sorted(counts.items()):
            endpoints.add_metric([model, state], n)
        yield endpoints
        yield inflight

        temp = GaugeMetricFamily("garage_node_gpu_temperature_celsius", "GPU temperature", labels=["node", "name", "gpu"])
        power = GaugeMetricFamily("garage_node_gpu_power_watts", "GPU power draw", labels=["node", "name", "gpu"])
        util = GaugeMetricFamily("garage_node_gpu_utilization_ratio", "GPU utilisation (0-1)", labels=["node", "name", "gpu"])
        healthy = GaugeMetricFamily("garage_node_gpu_healthy", "1 if the GPU is healthy", labels=["node", "name", "gpu"])
        engine = GaugeMetricFamily("garage_node_engine_state", "1 for the engine's current state",
                                   labels=["node", "name", "state"])
        running = GaugeMetricFamily("garage_node_engine_requests_running", "Requests the engine runs",
                                    labels=["node", "name"])
        for node_id, report in self.table.fresh_reports():
            name = names.get(node_id, "")
            for g in report.gpus:
                labels = [node_id, name, str(g.index)]
                if g.temperature_c is not None:
                    temp.add_metric(labels, g.temperature_c)
                if g.power_w is not None:
                    power.add_metric(labels, g.power_w)
                if g.utilization_pct is not None:
                    util.add_metric(labels, g.utilization_pct / 100.0)
                healthy.add_metric(labels, 1.0 if g.healthy else 0.0)
            for state in EngineState:
                engine.add_metric([node_id, name, str(state)], 1.0 if report.engine.state == state else 0.0)
            if report.engine.requests_running is not None:
                running.add_metric([node_id, name], report.engine.requests_running)
        yield from (temp, power, util, healthy, engine, running)

        served = GaugeMetricFamily("garage_node_tokens_served", "Tokens a PC served through the gateway, ever",
                                   labels=["node", "name"])
        for node_id, total in sorted(self.node_tokens().items()):
            served.add_metric([node_id, names.get(node_id, "")], total)
        yield served
