"""Prometheus metrics of one server: queue, throughput, τ, acceptance per draft source, latencies.

Each server gets its own registry (several apps in one process, as in tests, do not collide), with the
process collector so `process_resident_memory_bytes` is scraped beside them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from hsd_rag.stats import GenerationStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
TAU_BUCKETS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12)
THROUGHPUT_WINDOW_S = 30.0  # tokens/s gauge: generated tokens over this trailing window


class SlidingRate:
    """Events per second over a trailing window (thread-safe): what the tokens/s gauge reads when scraped."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, count))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.queue_depth = Gauge("hsd_rag_queue_depth", "Requests waiting for the engine", registry=r)
        self.running = Gauge("hsd_rag_requests_running", "Requests the engine is generating (0 or 1)", registry=r)
        self.requests = Counter(
            "hsd_rag_requests", "Finished requests by endpoint and outcome", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "hsd_rag_request_latency_seconds", "Arrival to last byte, by endpoint", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "hsd_rag_queue_wait_seconds", "Time a request waited for the engine", buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "hsd_rag_time_to_first_token_seconds", "Arrival to first generated text", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("hsd_rag_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("hsd_rag_generated_tokens", "Tokens generated (also cancelled ones)",
                                        registry=r)
        self._rate = SlidingRate()
        tokens_per_s = Gauge(
            "hsd_rag_tokens_per_second", f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:.0f} s",
            registry=r,
        )
        tokens_per_s.set_function(self._rate.rate)
        self.tau = Histogram("hsd_rag_tau", "Tokens per target forward, per finished generation",
                             buckets=TAU_BUCKETS, registry=r)
        self.drafted = Counter("hsd_rag_drafted_tokens", "Draft tokens verified, per source", ["source"], registry=r)
        self.accepted = Counter("hsd_rag_accepted_tokens", "Draft tokens accepted, per source", ["source"],
                                registry=r)
        self.acceptance = Gauge("hsd_rag_acceptance_rate", "Accepted / drafted tokens since start, per source",
                                ["source"], registry=r)
        self.cancelled = Counter("hsd_rag_cancelled", "Generations stopped early, by reason", ["reason"], registry=r)
        self.rejected = Counter("hsd_rag_rejected", "Requests refused before queueing, by reason", ["reason"],
                                registry=r)
        self._totals: dict[str, list[int]] = {}  # source -> [drafted, accepted], for the acceptance gauge
        self._totals_lock = threading.Lock()

    def tokens_generated(self, count: int) -> None:
        self.generated_tokens.inc(count)
        self._rate.add(count)

    def generation_finished(self, stats: GenerationStats) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        if stats.steps:
            self.tau.observe(stats.tau)
        with self._totals_lock:
            for source in set(stats.drafted_by_source) | set(stats.accepted_by_source):
                drafted = stats.drafted_by_source.get(source, 0)
                accepted = stats.accepted_by_source.get(source, 0)
                self.drafted.labels(source).inc(drafted)
                self.accepted.labels(source).inc(accepted)
                totals = self._totals.setdefault(source, [0, 0])
                totals[0] += drafted
                totals[1] += accepted
                if totals[0]:
                    self.acceptance.labels(source).set(totals[1] / totals[0])

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
