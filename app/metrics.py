"""Prometheus metrics: counters and histograms fed as requests finish, gauges read from the
live scheduler and mirrors at scrape time. Each app has its own registry (no globals)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app.domain.jobs import Job

GENERATION_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# The latest finals kept for the status page's charts: (finished_at, told avg_time or None,
# actual seconds from queued to final).
FINISHES_KEPT = 5000
QUEUE_WAIT_BUCKETS_S = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ETA_ERROR_BUCKETS_S = (-120, -60, -30, -10, -5, -2, 0, 2, 5, 10, 30, 60, 120)
LOOP_LAG_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}
        self.finishes: collections.deque[tuple[float, float | None, float]] = collections.deque(maxlen=FINISHES_KEPT)
        self.requests = Counter(
            "devoid_requests",
            "Finished requests by final status",
            ["status", "executor", "service"],
            registry=self.registry,
        )
        self.generation = Histogram(
            "devoid_generation_seconds",
            "Backend time per successful job",
            ["backend"],
            buckets=GENERATION_BUCKETS_S,
            registry=self.registry,
        )
        self.eta_error = Histogram(
            "devoid_eta_error_seconds",
            "Actual minus promised (avg_time of `queued`) seconds to result",
            buckets=ETA_ERROR_BUCKETS_S,
            registry=self.registry,
        )

        self.accepted = Counter(
            "devoid_accepted_requests",
            "Requests committed and answered `queued`",
            ["executor", "class"],
            registry=self.registry,
        )
        self.dispatches = Counter(
            "devoid_dispatches",
            "Attempts started on a backend (a retried request is dispatched again)",
            ["backend"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "devoid_queue_wait_seconds",
            "From `queued` to the first dispatch",
            ["executor", "class"],
            buckets=QUEUE_WAIT_BUCKETS_S,
            registry=self.registry,
        )
        self.refused = Counter(
            "devoid_refused_requests",
            "Requests refused before they were queued, by refusal code (docs/protocol.md)",
            ["code", "service"],
            registry=self.registry,
        )
        self.moderated = Counter(
            "devoid_moderation_checks",
            "Moderation checks of requests with settings.moderate: stage prompt (the rules, at intake) "
            "or image (IMAGE_CHECK_URL); outcome passed or blocked",
            ["stage", "outcome"],
            registry=self.registry,
        )

        self.loop_lag = Histogram(
            "devoid_event_loop_lag_seconds",
            "How late the event loop ran a timer, probed every 0.25 s: what everything due then waited",
            buckets=LOOP_LAG_BUCKETS_S,
            registry=self.registry,
        )

        self.pruned = Counter(
            "devoid_pruned_requests",
            "Finished requests pruned to a summary after RETENTION_S",
            registry=self.registry,
        )
        self.forgotten = Counter(
            "devoid_deleted_summaries",
            "Request summaries deleted after SUMMARY_RETENTION_S",
            registry=self.registry,
        )

    def watch(self, read_live: Callable[[], Iterator[GaugeMetricFamily]]) -> None:
        """Register gauges computed by `read_live` at each scrape."""
        self.registry.register(_LiveCollector(read_live))

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """metric.labels(*labels), kept: labels() checks and locks on every call (~3 us, a
        few times per request). Label values are bounded: services, backends, executors."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_refused(self, code: str | None, service: str) -> None:
        self._child(self.refused, code or "invalid_request", service).inc()

    def request_accepted(self, job: Job) -> None:
        self._child(self.accepted, job.executor.value, "premium" if job.premium else "general").inc()

    def request_dispatched(self, job: Job, backend: str) -> None:
        self._child(self.dispatches, backend).inc()
        if job.attempts == 0 and job.interruptions == 0:
            self._child(self.queue_wait, job.executor.value, "premium" if job.premium else "general").observe(
                max(0.0, time.time() - job.created_at)
            )

    def request_finished(self, job: Job, generation_s: float | None) -> None:
        self._child(self.requests, job.status.value, job.executor.value, job.service).inc()
        if generation_s is not None and job.backend and job.status.value == "ok":
            self._child(self.generation, job.backend).observe(generation_s)
        if job.finished_at is not None:
            actual_s = job.finished_at - job.created_at
            self.finishes.append((job.finished_at, job.eta_s, actual_s))
            if job.eta_s is not None:
                self.eta_error.observe(actual_s - job.eta_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def live_families(queues: list[dict], backends: list[dict], mirrors: list[dict]) -> Iterator[GaugeMetricFamily]:
    """Gauges of the moment, from the scheduler's and the mirrors' status."""
    depth = GaugeMetricFamily("devoid_queue_depth", "Requests waiting", labels=["executor", "class"])
    running = GaugeMetricFamily("devoid_generating", "Requests generating", labels=["executor"])
    for queue in queues:
        depth.add_metric([queue["executor"], "general"], queue["general_waiting"])
        depth.add_metric([queue["executor"], "premium"], queue["premium_waiting"])
        running.add_metric([queue["executor"]], queue["generating"])
    up = GaugeMetricFamily(
        "devoid_backend_up", "1 if the backend is in service (healthy or busy)", labels=["backend", "executor", "state"]
    )
    speed = GaugeMetricFamily("devoid_backend_speed_units_per_second", "Learned backend speed", labels=["backend"])
    for backend in backends:
        up.add_metric(
            [backend["name"], backend["executor"], backend["state"]],
            1 if backend["state"] in ("healthy", "busy") else 0,
        )
        speed.add_metric([backend["name"]], backend["units_per_s"])
    backlog = GaugeMetricFamily(
        "devoid_mirror_backlog", "Mirror work waiting in the outbox", labels=["mirror", "state"]
    )
    for mirror in mirrors:
        backlog.add_metric([mirror["name"], mirror["state"]], mirror["backlog"])
    yield from (depth, running, up, speed, backlog)


class _LiveCollector(Collector):
    def __init__(self, read_live: Callable[[], Iterator[GaugeMetricFamily]]) -> None:
        self._read_live = read_live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._read_live()

    def describe(self) -> list:
        return []
