"""Prometheus text metrics of one gateway process, without a client library.

Counters and a latency histogram live in memory; jobs by state are read
from Redis at scrape time, so they agree across gateway instances.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


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

    def render(self, jobs_by_state: Mapping[str, int]) -> str:
        out = ["# HELP bitinglip_http_requests_total HTTP requests by method, route and status.",
               "# TYPE bitinglip_http_requests_total counter"]
        with self._lock:
            for (method, route, status), n in sorted(self.requests.items()):
                out.append(f"bitinglip_http_requests_total{_labels(method=method, route=route, status=status)} {n}")
            out += ["# HELP bitinglip_http_request_duration_seconds Request latency by route.",
                    "# TYPE bitinglip_http_request_duration_seconds histogram"]
            for route in sorted(self.latency_count):
                for bound, n in zip(BUCKETS, self.latency_buckets[route]):
                    out.append(f"bitinglip_http_request_duration_seconds_bucket{_labels(route=route, le=str(bound))} {n}")
                count = self.latency_count[route]
                out.append(f"bitinglip_http_request_duration_seconds_bucket{_labels(route=route, le='+Inf')} {count}")
                out.append(f"bitinglip_http_request_duration_seconds_sum{_labels(route=route)} "
                           f"{self.latency_sum[route]:.6f}")
                out.append(f"bitinglip_http_request_duration_seconds_count{_labels(route=route)} {count}")
            out += ["# HELP bitinglip_rate_limit_rejections_total Requests refused with 429, by bucket.",
                    "# TYPE bitinglip_rate_limit_rejections_total counter"]
            for bucket in ("read", "write"):
                out.append(f"bitinglip_rate_limit_rejections_total{_labels(bucket=bucket)} {self.rate_limited[bucket]}")
        out += ["# HELP bitinglip_jobs Jobs by state (finished ones within the job TTL).",
                "# TYPE bitinglip_jobs gauge"]
        for state, n in jobs_by_state.items():
            out.append(f"bitinglip_jobs{_labels(state=state)} {n}")
        return "\n".join(out) + "\n"
