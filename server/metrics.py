"""GET /metrics: the server's counters and gauges in the Prometheus text format (0.0.4)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from zorba_server.committer import Committer
from zorba_server.coordinator import Coordinator

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class RequestStats:
    """What the HTTP layer counts: answers by endpoint and status, refusals by error code."""

    responses: Counter[tuple[str, int]] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)


def render(coordinator: Coordinator, committer: Committer, stats: RequestStats) -> str:
    now = coordinator.now()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP zorba_{name} {help_}")
        lines.append(f"# TYPE zorba_{name} {kind}")
        for labels, value in samples:
            lines.append(f"zorba_{name}{labels} {value:g}")

    c = coordinator.counters
    metric("registrations_total", "counter", "Clients registered.", [("", c["registrations"])])
    metric("reports_accepted_total", "counter", "Reports committed and acknowledged.",
           [("", c["reports_accepted"])])
    metric("rounds_total", "counter", "Closed rounds by outcome.",
           [('{status="applied"}', c["rounds_applied"]), ('{status="failed"}', c["rounds_failed"])])
    metric("schedules_solved_total", "counter", "Scheduler runs.", [("", c["schedules_solved"])])
    metric("refusals_total", "counter", "Requests refused, by error code.",
           [(f'{{code="{code}"}}', n) for code, n in sorted(stats.refusals.items())])
    metric("responses_total", "counter", "HTTP answers by route and status.",
           [(f'{{route="{route}",status="{status}"}}', n)
            for (route, status), n in sorted(stats.responses.items())])
    metric("commit_batches_total", "counter", "Database transactions.", [("", committer.batches)])
    metric("commit_ops_total", "counter", "Writes grouped into those transactions.",
           [("", committer.ops)])
    metric("commit_seconds_total", "counter", "Time spent in database transactions.",
           [("", committer.busy_s)])
    metric("alpha_version", "gauge", "Applied rounds.", [("", coordinator.version)])
    r = coordinator.open
    metric("round", "gauge", "Number of the open round (0: none open).",
           [("", r.plan.round if r is not None else 0)])
    metric("round_reports", "gauge", "Reports committed in the open round.",
           [("", len(r.received) if r is not None else 0)])
    metric("round_assigned", "gauge", "Clients assigned in the open round.",
           [("", len(r.plan.clients) if r is not None else 0)])
    metric("clients", "gauge", "Registered clients.", [("", len(coordinator.members))])
    metric("clients_active", "gauge", "Clients seen within the membership timeout.",
           [("", len(coordinator.active_members(now)))])
    metric("schedule_solve_seconds", "gauge", "Duration of the last scheduler run.",
           [("", coordinator.schedule_solve_s)])
    losses = [h.loss for h in coordinator.history if h.loss is not None]
    if losses:
        metric("last_round_loss", "gauge", "Weighted mean training loss of the last closed round.",
               [("", losses[-1])])
    return "\n".join(lines) + "\n"
