"""The audits' Prometheus series, read from the audit loop at scrape time and registered on
the gateway's registry (one scrape of the head). The quarantine gauges are the gateway's
(head/gateway/metrics.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from garage_node.head.audit.auditor import Auditor


class AuditCollector(Collector):
    def __init__(self, auditor: Auditor, node_names: Callable[[], dict[str, str]]) -> None:
        self.auditor, self.node_names = auditor, node_names

    def collect(self) -> Iterable[Metric]:
        a = self.auditor
        c = a.counters
        kept = CounterMetricFamily("garage_audit_samples_kept", "Completed requests kept for re-scoring")
        kept.add_metric([], c.kept)
        dropped = CounterMetricFamily("garage_audit_samples_dropped",
                                      "Samples dropped unscored, the queue being full ([audit] max_pending)")
        dropped.add_metric([], c.dropped)
        pending = GaugeMetricFamily("garage_audit_samples_pending", "Samples waiting for the verifier")
        pending.add_metric([], len(a.pending) + len(a.recheck_pending))
        scored = CounterMetricFamily("garage_audit_scored", "Audits scored by the verifier, by kind "
                                     "(customer, canary, recheck)", labels=["kind"])
        for kind, n in sorted(dict(c.by_kind).items()):  # copies: the loop's thread writes them
            scored.add_metric([kind], n)
        errors = CounterMetricFamily("garage_audit_errors", "Samples the verifier could not score")
        errors.add_metric([], c.errors)
        sent = CounterMetricFamily("garage_audit_canaries", "Canary requests the head sent through the gateway")
        sent.add_metric([], c.canaries)
        verifier = GaugeMetricFamily("garage_audit_verifier_up",
                                     "1 while the last pass found a verifier (a trusted PC or verifier_url)")
        verifier.add_metric([], 1 if a.verifier_up else 0)
        evidence = GaugeMetricFamily("garage_audit_evidence", "Each PC's sequential-test sum per test (quarantine "
                                     "at garage_audit_threshold)", labels=["node", "name", "test"])
        names = self.node_names()
        for node, rec in sorted(dict(a.records).items()):
            for test, v in rec.sums.items():
                evidence.add_metric([node, names.get(node, ""), test], v)
        threshold = GaugeMetricFamily("garage_audit_threshold", "The sum at which a PC is quarantined")
        threshold.add_metric([], a.thresholds.upper)
        yield from (kept, dropped, pending, scored, errors, sent, verifier, evidence, threshold)
