"""GET /metrics: the server's counters, gauges and request latencies, via prometheus-client.

Each application owns its own `CollectorRegistry` (no module-level metrics), so two servers in
one process, as in the tests, never share or double-register a series. The coordinator's and
the committer's numbers are read when Prometheus scrapes (a custom collector), not copied on
every change; what only the HTTP layer sees (answers, refusals, latencies) is counted by
`RequestStats` as requests leave.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from zorba_server.coordinator import Coordinator
from zorba_server.storage.store import CommitStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0, 120.0, 300.0)
"""Reports are acknowledged in milliseconds; a long poll of /v1/rounds/next waits up to its
`wait` (minutes at most), so the buckets reach that far."""


class RequestStats:
    """What the HTTP layer counts, in the application's own registry.

    Every request's answer and latency are counted in plain dicts and lists and handed to
    Prometheus when it scrapes (`_AnswerCollector`): prometheus-client's own Counter and
    Histogram take a lock per update and walk the buckets in Python, 3 us a request, a
    twentieth of the server's CPU per report. The series and their text are the same
    (`zorba_responses`, `zorba_request_seconds`); refusals, rarer, stay plain Counters.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter("zorba_refusals", "Requests refused, by error code.", ["code"],
                                registry=registry)
        self.enrolment_failures = Counter(
            "zorba_enrolment_failures", "Registrations refused: a wrong enrolment secret "
            "(wrong_secret), or a source waiting out its delay after too many (throttled).",
            ["outcome"], registry=registry)
        self.responses: dict[tuple[str, int], _Count] = {}
        """Answers by (route, status)."""
        self.latency: dict[tuple[str, str], _Latency] = {}
        """Latencies by (route, method)."""
        registry.register(_AnswerCollector(self))

    def answered(self, route: str, method: str, status: int, seconds: float,
                 refusal: str | None = None) -> None:
        count = self.responses.get((route, status))
        if count is None:
            count = self.responses[(route, status)] = _Count(time.time())
        count.value += 1
        latency = self.latency.get((route, method))
        if latency is None:
            latency = self.latency[(route, method)] = _Latency(time.time())
        latency.buckets[bisect_left(_BOUNDS, seconds)] += 1  # le: the first bound >= seconds
        latency.sum += seconds
        if refusal is not None:
            self.refusals.labels(refusal).inc()


_BOUNDS = (*LATENCY_BUCKETS_S, math.inf)


@dataclass
class _Count:
    created: float
    value: int = 0


@dataclass
class _Latency:
    created: float
    buckets: list[int] = field(default_factory=lambda: [0] * len(_BOUNDS))
    """Observations per bucket (not cumulative: Prometheus's are summed when scraped)."""
    sum: float = 0.0


class _AnswerCollector:
    """`RequestStats`' answers and latencies as Prometheus's Counter and Histogram show them."""

    def __init__(self, stats: RequestStats) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        responses = CounterMetricFamily("zorba_responses", "HTTP answers by route and status.",
                                        labels=["route", "status"])
        for (route, status), count in self._stats.responses.items():
            responses.add_metric([route, str(status)], count.value, created=count.created)
        yield responses
        latency = HistogramMetricFamily("zorba_request_seconds",
                                        "Time from a request's arrival to its answer, by route.",
                                        labels=["route", "method"])
        for (route, method), seen in self._stats.latency.items():
            cumulative = list(accumulate(seen.buckets))
            latency.add_metric([route, method], [(floatToGoString(b), n) for b, n in
                                                 zip(_BOUNDS, cumulative, strict=True)], seen.sum)
            latency.add_sample("zorba_request_seconds_created", {"route": route, "method": method},
                               seen.created)
        yield latency


class Metrics:
    """One application's registry: process metrics, request stats and the run's own numbers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = RequestStats(self.registry)
        self._run: _RunCollector | None = None

    def watch(self, coordinator: Coordinator, commits: CommitStats) -> None:
        """Report this coordinator's numbers from now on (once the application has started)."""
        if self._run is None:
            self._run = _RunCollector()
            self.registry.register(self._run)
        self._run.watched = (coordinator, commits)

    def unwatch(self) -> None:
        if self._run is not None:
            self._run.watched = None

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RunCollector:
    """The coordinator's counters and gauges, read at scrape time."""

    def __init__(self) -> None:
        self.watched: tuple[Coordinator, CommitStats] | None = None

    def describe(self) -> list[Metric]:
        return []  # the series depend on the run; registration must not call collect() early

    def collect(self) -> Iterator[Metric]:
        if self.watched is None:
            return  # starting or stopped: the process and request metrics still answer
        coordinator, commits = self.watched
        now = coordinator.now()
        c = coordinator.counters

        def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"zorba_{name}", help_, value=value)

        def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"zorba_{name}", help_, value=value)

        yield counter("registrations_total", "Clients registered.", c["registrations"])
        yield counter("reports_accepted_total", "Reports committed and acknowledged.",
                      c["reports_accepted"])
        rounds = CounterMetricFamily("zorba_rounds_total", "Closed rounds by outcome.",
                                     labels=["status"])
        rounds.add_metric(["applied"], c["rounds_applied"])
        rounds.add_metric(["rejected"], c["rounds_rejected"])
        rounds.add_metric(["failed"], c["rounds_failed"])
        rounds.add_metric(["checked"], c["rounds_checked"])
        yield rounds
        yield counter("schedules_solved_total", "Scheduler runs.", c["schedules_solved"])
        yield counter("commit_batches_total", "Database transactions.", commits.batches)
        yield counter("commit_ops_total", "Writes grouped into those transactions.", commits.ops)
        yield counter("commit_seconds_total", "Time spent in database transactions.",
                      commits.busy_s)
        yield gauge("alpha_version", "Applied rounds.", coordinator.engine.version)
        r = coordinator.engine.open
        yield gauge("round", "Number of the open round (0: none open).",
                    r.plan.round if r is not None else 0)
        yield gauge("round_reports", "Reports committed in the open round.",
                    len(r.received) if r is not None else 0)
        yield gauge("round_assigned", "Clients assigned in the open round.",
                    len(r.plan.clients) if r is not None else 0)
        yield gauge("clients", "Registered clients.", len(coordinator.engine.members))
        yield gauge("clients_active", "Clients seen within the membership timeout.",
                    len(coordinator.engine.active_members(now)))
        yield gauge("schedule_solve_seconds", "Duration of the last scheduler run.",
                    coordinator.engine.schedule_solve_s)
        yield from _client_gauges(coordinator)
        losses = [h.loss for h in coordinator.engine.history if h.loss is not None]
        if losses:
            yield gauge("last_round_loss", "Weighted mean training loss of the last closed round.",
                        losses[-1])


def _client_gauges(coordinator: Coordinator) -> Iterator[Metric]:
    """Per client: the last reported peak beside the declared budget, and the last reported
    round's body bytes each way (a label per client: fleets of the size this server runs)."""
    budget = GaugeMetricFamily("zorba_client_budget_bytes", "Memory budget the client declared.",
                               labels=["client"])
    peak = GaugeMetricFamily("zorba_client_last_peak_bytes",
                             "Peak memory the client measured in its last report.",
                             labels=["client"])
    wire = GaugeMetricFamily("zorba_client_round_bytes",
                             "Body bytes of the client's last reported round (stored with its "
                             "report: a restart keeps it), by direction.",
                             labels=["client", "direction"])
    for cid, m in sorted(coordinator.engine.members.items()):
        budget.add_metric([cid], m.profile.memory_budget_bytes)
        peak.add_metric([cid], m.last_peak_bytes)
        traffic = coordinator.traffic.get(cid)
        if traffic is not None and traffic.last_round is not None:
            wire.add_metric([cid, "up"], traffic.last_round.up)
            wire.add_metric([cid, "down"], traffic.last_round.down)
    yield from (budget, peak, wire)
