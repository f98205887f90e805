"""The gateway's /metrics text, as Prometheus parses it (no cluster, no Redis)."""

from __future__ import annotations

import pytest

from bitinglip.gateway.metrics import BUCKETS, Metrics

parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client is not installed")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in parser.text_string_to_metric_families(text) for s in fam.samples}


def test_series_and_values() -> None:
    metrics = Metrics()
    metrics.observe("GET", "/v1/jobs", 200, 0.02)
    metrics.observe("GET", "/v1/jobs", 200, 3.0)
    metrics.observe("POST", '/v1/"q"', 422, 0.001)
    metrics.rejected("write")
    text = metrics.render({"queued": 2, "running": 0})
    got = _samples(text)
    assert got[("bitinglip_http_requests_total", (("method", "GET"), ("route", "/v1/jobs"), ("status", "200")))] == 2
    assert got[("bitinglip_http_requests_total", (("method", "POST"), ("route", '/v1/"q"'), ("status", "422")))] == 1
    route = ("route", "/v1/jobs")
    assert got[("bitinglip_http_request_duration_seconds_bucket", (("le", "0.01"), route))] == 0
    assert got[("bitinglip_http_request_duration_seconds_bucket", (("le", "0.025"), route))] == 1
    assert got[("bitinglip_http_request_duration_seconds_bucket", (("le", "5.0"), route))] == 2
    assert got[("bitinglip_http_request_duration_seconds_bucket", (("le", "+Inf"), route))] == 2
    assert got[("bitinglip_http_request_duration_seconds_count", (route,))] == 2
    assert got[("bitinglip_http_request_duration_seconds_sum", (route,))] == pytest.approx(3.02)
    assert got[("bitinglip_rate_limit_rejections_total", (("bucket", "read"),))] == 0  # there before any refusal
    assert got[("bitinglip_rate_limit_rejections_total", (("bucket", "write"),))] == 1
    assert got[("bitinglip_jobs", (("state", "queued"),))] == 2
    assert got[("bitinglip_jobs", (("state", "running"),))] == 0
    assert "# TYPE bitinglip_http_request_duration_seconds histogram" in text
    assert "_created" not in text  # no series beyond the ones alerts and dashboards name
    buckets = [k for k in got if k[0].endswith("_bucket") and k[1][1] == route]
    assert len(buckets) == len(BUCKETS) + 1


def test_two_gateways_keep_their_own_series() -> None:
    one, two = Metrics(), Metrics()
    one.observe("GET", "/health", 200, 0.01)
    assert "/health" in one.render({}) and "/health" not in two.render({})


def test_every_rate_limit_bucket_is_exported() -> None:
    """The infer bucket's 429s were counted and never exported: metrics knew two buckets, the limiter three."""
    from bitinglip.gateway.ratelimit import RATE_BUCKETS, bucket_rates
    from bitinglip.settings import Settings

    assert set(bucket_rates(Settings())) == set(RATE_BUCKETS) >= {"read", "write", "infer"}
    metrics = Metrics()
    for bucket in RATE_BUCKETS:
        metrics.rejected(bucket)
    got = _samples(metrics.render({}))
    assert {b: got.get(("bitinglip_rate_limit_rejections_total", (("bucket", b),))) for b in RATE_BUCKETS} == \
        dict.fromkeys(RATE_BUCKETS, 1)
