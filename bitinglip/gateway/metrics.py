"""Prometheus metrics of one gateway process, written by ``prometheus_client``.

Counters and a latency histogram live in memory; jobs by state are read
from Redis at scrape time, so they agree across gateway instances.  The
figures are handed to ``prometheus_client`` as metric families by a
collector in a registry of this gateway's own: two apps in one process
(tests) keep their series apart, and no ``*_created`` series appear, which
``prometheus_client``'s own ``Counter`` would add to every counter.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# the rate-limit buckets are exported at 0 before the first refusal, so an alert's series exists from the start
from bitinglip.gateway.ratelimit import RATE_BUCKETS

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.rate_limited: dict[str, int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, str(status))] += 1
            buckets = self.latency_buckets[route]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.latency_sum[route] += seconds
            self.latency_count[route] += 1

    def rejected(self, bucket: str) -> None:
        with self._lock:
            self.rate_limited[bucket] += 1

    def families(self, jobs_by_state: Mapping[str, int]) -> list[Metric]:
        """The gateway's series as ``prometheus_client`` metric families."""
        # prometheus_client appends _total to a counter's name itself
        requests = CounterMetricFamily("bitinglip_http_requests", "HTTP requests by method, route and status.",
                                       labels=("method", "route", "status"))
        latency = HistogramMetricFamily("bitinglip_http_request_duration_seconds", "Request latency by route.",
                                        labels=("route",))
        limited = CounterMetricFamily("bitinglip_rate_limit_rejections", "Requests refused with 429, by bucket.",
                                      labels=("bucket",))
        with self._lock:
            for labels, n in sorted(self.requests.items()):
                requests.add_metric(labels, n)
            for route in sorted(self.latency_count):
                bounds = [*(str(b) for b in BUCKETS), "+Inf"]
                counts = [*self.latency_buckets[route], self.latency_count[route]]
                latency.add_metric((route,), list(zip(bounds, counts)), self.latency_sum[route])
            for bucket in RATE_BUCKETS:
                limited.add_metric((bucket,), self.rate_limited[bucket])
        jobs = GaugeMetricFamily("bitinglip_jobs", "Jobs by state (finished ones within the job TTL).",
                                 labels=("state",))
        for state, n in jobs_by_state.items():
            jobs.add_metric((state,), n)
        return [requests, latency, limited, jobs]

    def render(self, jobs_by_state: Mapping[str, int]) -> str:
        """The Prometheus text format (version 0.0.4)."""
        registry = CollectorRegistry()
        registry.register(_Scrape(self.families(jobs_by_state)))  # type: ignore[arg-type]
        return generate_latest(registry).decode()


class _Scrape:
    """One scrape's families, as the collector ``prometheus_client`` asks for."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
