"""GET /metrics: the run's counters and gauges under their names, request-latency histograms
per route, process metrics, and one registry per application."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fakes import FakeClient, config_dict, make_report, profile

from zorba_server.app import create_app
from zorba_server.config import config_from_dict

pytestmark = pytest.mark.asyncio

RUN_METRICS = {
    "zorba_registrations", "zorba_reports_accepted", "zorba_rounds", "zorba_schedules_solved",
    "zorba_refusals", "zorba_responses", "zorba_commit_batches", "zorba_commit_ops",
    "zorba_commit_seconds", "zorba_alpha_version", "zorba_round", "zorba_round_reports",
    "zorba_round_assigned", "zorba_clients", "zorba_clients_active", "zorba_schedule_solve_seconds",
    "zorba_last_round_loss",
}
"""The names /metrics had before prometheus-client (the parser drops counters' `_total`)."""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(http: Any) -> tuple[set[str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    resp = await http.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    return {f.name for f in text_string_to_metric_families(text)}, samples(text)


async def test_metrics_keep_their_names_and_add_latency_histograms_and_process_metrics(
        tmp_path: Path, aiohttp_client: Any) -> None:
    app = create_app(config_from_dict(config_dict(tmp_path / "s.sqlite3")))
    http = await aiohttp_client(app)
    c = FakeClient(http)
    assert (await c.register(profile())).status == 201
    for loss in (2.0, 1.5):
        a = (await c.poll()).assignment
        assert (await c.report(a.round, make_report(a, loss=loss))).status == 200
    await c.poll()  # the second round closes on this poll
    assert (await http.get("/v1/state")).status == 401  # no token: one refusal
    names, values = await scrape(http)

    assert RUN_METRICS <= names, f"missing: {sorted(RUN_METRICS - names)}"
    assert values[("zorba_rounds_total", frozenset({("status", "applied")}))] == 2
    assert values[("zorba_reports_accepted_total", frozenset())] == 2
    assert values[("zorba_last_round_loss", frozenset())] == 1.5
    report_route = frozenset({("route", r"/v1/rounds/{round}/reports"), ("method", "POST")})
    assert values[("zorba_request_seconds_count", report_route)] == 2
    register = frozenset({("route", "/v1/clients"), ("method", "POST")})
    assert values[("zorba_request_seconds_count", register)] == 1
    assert values[("zorba_request_seconds_bucket", register | {("le", "+Inf")})] == 1
    assert values[("zorba_request_seconds_sum", register)] > 0
    unauthorized = [v for (name, labels), v in values.items()
                    if name == "zorba_refusals_total" and ("code", "unauthorized") in labels]
    assert unauthorized == [1]
    assert values[("zorba_responses_total", frozenset({("route", "/v1/state"), ("status", "401")}))] == 1
    assert values[("process_resident_memory_bytes", frozenset())] > 0


async def test_two_servers_in_one_process_count_their_own_requests(
        tmp_path: Path, aiohttp_client: Any) -> None:
    first = await aiohttp_client(create_app(config_from_dict(config_dict(tmp_path / "a.sqlite3"))))
    second = await aiohttp_client(create_app(config_from_dict(config_dict(tmp_path / "b.sqlite3"))))
    for _ in range(3):
        assert (await FakeClient(first).register(profile())).status == 201
    _, a = await scrape(first)
    _, b = await scrape(second)
    assert a[("zorba_registrations_total", frozenset())] == 3
    assert b[("zorba_registrations_total", frozenset())] == 0
    register = frozenset({("route", "/v1/clients"), ("method", "POST")})
    assert a[("zorba_request_seconds_count", register)] == 3
    assert ("zorba_request_seconds_count", register) not in b


async def test_answers_and_latencies_read_as_prometheus_own_counter_and_histogram_would_show_them(
) -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from zorba_server.metrics import LATENCY_BUCKETS_S, Metrics

    reference = CollectorRegistry()
    responses = Counter("zorba_responses", "HTTP answers by route and status.", ["route", "status"],
                        registry=reference)
    latency = Histogram("zorba_request_seconds", "Time from a request's arrival to its answer, by "
                        "route.", ["route", "method"], buckets=LATENCY_BUCKETS_S, registry=reference)
    ours = Metrics()
    answers = [("/v1/clients", "POST", 201, 0.004), ("/v1/state", "GET", 401, 0.0005),
               ("/v1/rounds/next", "GET", 200, 2.5), ("/v1/rounds/next", "GET", 200, 0.001),
               ("/v1/rounds/next", "GET", 200, 0.0025), ("unmatched", "GET", 404, 0.0),
               ("/v1/rounds/next", "GET", 200, 500.0)]  # on a bound, at 0, past the last
    for route, method, status, seconds in answers:
        responses.labels(route, str(status)).inc()
        latency.labels(route, method).observe(seconds)
        ours.requests.answered(route, method, status, seconds)

    def shown(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {key: value for key, value in samples(text).items()
                if key[0].startswith(("zorba_responses", "zorba_request_seconds"))
                and not key[0].endswith("_created")}

    expected = shown(generate_latest(reference).decode())
    assert len(expected) == 4 + 4 * (len(LATENCY_BUCKETS_S) + 3)  # 4 series of each
    assert shown(ours.render().decode()) == expected
