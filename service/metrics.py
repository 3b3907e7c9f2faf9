"""Prometheus metrics of the service, in a registry of its own (one per app, so tests and several
apps in one process never collide). Names follow Prometheus conventions: base units, ``_total``
for counters, ``_seconds`` for durations."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

__all__ = ["ServiceMetrics", "CONTENT_TYPE_LATEST"]


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("committee_requests_total", "Inference requests by model, endpoint and outcome",
                                ["model", "endpoint", "outcome"], registry=r)
        self.request_duration = Histogram("committee_request_duration_seconds", "End-to-end request latency",
                                          ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("committee_queue_wait_seconds", "Time a request waited for its batch to start",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("committee_batch_compute_seconds", "ONNX Runtime time per batch",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("committee_batch_size", "Images per executed batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("committee_queue_depth", "Images waiting in the model's batcher", ["model"], registry=r)
        self.inflight = Gauge("committee_inflight_requests", "Requests being served", ["model"], registry=r)
        self.cascade_exits = Counter("committee_cascade_exits_total", "Images answered by each cascade stage",
                                     ["model", "stage"], registry=r)
        self.model_ready = Gauge("committee_model_ready", "1 when the served version of a model is loaded, else 0",
                                 ["model", "version"], registry=r)
        self.unrouted = Counter("committee_unrouted_requests_total",
                                "Inference requests refused before a model was resolved (unknown model, server full)",
                                ["endpoint", "status"], registry=r)
        self.shed = Counter("committee_shed_requests_total", "Requests refused by admission control (a model's, or the "
                            "server's: model=\"server\")",
                            ["model", "reason"], registry=r)
        self.dropped = Counter("committee_dropped_requests_total",
                               "Requests a model's batcher did not answer: expired (deadline passed while queued, never "
                               "computed) or abandoned (computed after the caller had given up)", ["model", "reason"], registry=r)
        self.late_answers = Counter("committee_late_answers_total", "Answers sent after their request's deadline",
                                    ["model", "endpoint"], registry=r)
        self.routing_decisions = Counter("committee_routing_decisions_total",
                                         "SLO-routed requests by the variant chosen and why", ["model", "reason"], registry=r)
        self.experiment_assignments = Counter("committee_experiment_assignments_total", "Requests assigned to each arm",
                                              ["experiment", "arm"], registry=r)
        self.shadow_runs = Counter("committee_shadow_runs_total", "Shadow predictions by outcome (done, dropped, failed)",
                                   ["experiment", "outcome"], registry=r)
        self.shadow_agreements = Counter("committee_shadow_agreements_total",
                                         "Shadow predictions whose top-1 matched the primary's", ["experiment"], registry=r)
        self.feedback = Counter("committee_feedback_total", "Labelled feedback by arm and whether the answer was right",
                                ["experiment", "arm", "outcome"], registry=r)
        self.experiment_state_up = Gauge("committee_experiment_state_up",
                                         "1 while the experiment database answers, else 0 (experiments keep serving, records buffer)",
                                         registry=r)
        self.experiment_records_pending = Gauge("committee_experiment_records_pending",
                                                "Experiment records buffered for the database", registry=r)
        self.experiment_records_dropped = Counter("committee_experiment_records_dropped_total",
                                                  "Experiment records lost: buffer_full (database away too long), rejected (by the database), closing",
                                                  ["reason"], registry=r)
        self.model_load_failures = Counter("committee_model_load_failures_total", "Failed loads of a model version",
                                           ["model"], registry=r)

    def observer(self, runner: str) -> BatchObserverForRunner:
        return BatchObserverForRunner(self, runner)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class BatchObserverForRunner:
    """Feeds one runner's batcher measurements into the service metrics (label ``model`` = name:version)."""

    def __init__(self, metrics: ServiceMetrics, runner: str) -> None:
        self._batch = metrics.batch_size.labels(runner)
        self._compute = metrics.compute.labels(runner)
        self._depth = metrics.queue_depth.labels(runner)
        self._shed = metrics.shed
        self._dropped = metrics.dropped
        self._runner = runner
        for reason in ("queue_full", "expected_wait"):  # every series a panel or alert reads exists from the start
            metrics.shed.labels(runner, reason)
        for reason in ("expired", "abandoned"):
            metrics.dropped.labels(runner, reason)

    def batch_done(self, size: int, compute_s: float) -> None:
        self._batch.observe(size)
        self._compute.observe(compute_s)

    def queue_depth(self, images: int) -> None:
        self._depth.set(images)

    def shed(self, reason: str) -> None:
        self._shed.labels(self._runner, reason).inc()

    def dropped(self, reason: str, requests: int) -> None:
        self._dropped.labels(self._runner, reason).inc(requests)
