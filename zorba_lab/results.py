"""What a demo federation did, read back from the server's record and the proxies.

The server's record (read through its `Store`, zorba_lab/record.py) holds each round's plan
(who trained which blocks, how many steps) and each report (steps, loss, the client's
measured peak memory). The proxies add the real body bytes on each client's wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zorba_common.messages import DeviceProfile, Report
from zorba_lab.byte_proxy import TrafficCount
from zorba_lab.record import RunRecord, read_record

# One-off calls that are not part of a round's traffic.
_SETUP_ROUTES = ("/v1/clients", "/v1/state", "/v1/status")


@dataclass
class ClientFigures:
    name: str
    client_id: str
    budget_bytes: int
    blocks_per_round: list[int] = field(default_factory=list)
    """How many blocks the scheduler gave this client, per closed round it was assigned."""
    rounds_reported: int = 0
    steps: int = 0
    peak_bytes: int = 0
    """Largest peak the client measured (VmHWM per round) and reported."""
    sampled_peak_rss: int = 0
    """Largest RSS the demo sampled from outside, once per second, whole process life."""
    bytes_up: int = 0
    bytes_down: int = 0
    round_bytes_up: int = 0
    """Request bodies of round traffic (long-polls and reports), registration excluded."""
    round_bytes_down: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def rounds_assigned(self) -> int:
        return len(self.blocks_per_round)

    # Per round the client was assigned, not per round it reported: a late or refused round
    # (a fedavg upload after the deadline) still cost its traffic.
    @property
    def bytes_up_per_round(self) -> float:
        return self.round_bytes_up / max(self.rounds_assigned, 1)

    @property
    def bytes_down_per_round(self) -> float:
        return self.round_bytes_down / max(self.rounds_assigned, 1)

    @property
    def peak_over_budget(self) -> float:
        return self.peak_bytes / self.budget_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "client_id": self.client_id, "budget_bytes": self.budget_bytes,
            "blocks_per_round": self.blocks_per_round, "rounds_reported": self.rounds_reported,
            "steps": self.steps, "peak_bytes": self.peak_bytes,
            "peak_over_budget": round(self.peak_over_budget, 4),
            "sampled_peak_rss": self.sampled_peak_rss,
            "bytes_up_total": self.bytes_up, "bytes_down_total": self.bytes_down,
            "bytes_up_per_round": round(self.bytes_up_per_round, 1),
            "bytes_down_per_round": round(self.bytes_down_per_round, 1),
            "losses": self.losses,
        }


@dataclass(frozen=True)
class RoundRow:
    round: int
    status: str
    loss: float | None
    closed_at: float | None
    opened_at: float
    blocks: dict[str, tuple[int, ...]]
    excluded: dict[str, str]
    """Members the scheduler left out of this round, with its reason."""


def read_rounds(db_path: Path | str, record: RunRecord | None = None) -> list[RoundRow]:
    record = record or read_record(db_path)
    return [RoundRow(r.plan.round, r.status, r.loss, r.closed_at, r.plan.opened_at,
                     {cid: p.blocks for cid, p in r.plan.clients.items()}, dict(r.plan.excluded))
            for r in record.snapshot.rounds]


def read_clients(db_path: Path | str, record: RunRecord | None = None) -> dict[str, DeviceProfile]:
    """client_id -> registered profile."""
    record = record or read_record(db_path)
    return {c.client_id: c.profile for c in record.snapshot.clients}


def read_reports(db_path: Path | str,
                 record: RunRecord | None = None) -> list[tuple[int, str, Report]]:
    record = record or read_record(db_path)
    return [(round_, r.client_id, r.report) for round_, r in record.reports]


def client_figures(db_path: Path | str, traffic: dict[str, TrafficCount],
                   sampled_rss: dict[str, int]) -> list[ClientFigures]:
    """Per client (by its --name): blocks, steps, peaks and bytes."""
    record = read_record(db_path)
    figures = {cid: ClientFigures(p.name, cid, p.memory_budget_bytes)
               for cid, p in read_clients(db_path, record).items()}
    for row in read_rounds(db_path, record):
        if row.status == "open":
            continue  # opened as the demo stopped: never trained
        for cid, blocks in row.blocks.items():
            figures[cid].blocks_per_round.append(len(blocks))
    for _round, cid, report in read_reports(db_path, record):
        f = figures[cid]
        f.rounds_reported += 1
        f.steps += len(report.steps)
        f.peak_bytes = max(f.peak_bytes, report.peak_memory_bytes)
        f.losses.append(report.loss_mean)
    for f in figures.values():
        count = traffic.get(f.name)
        if count is not None:
            f.bytes_up, f.bytes_down = count.bytes_up, count.bytes_down
            for route, (_n, up, down) in count.by_route.items():
                if route not in _SETUP_ROUTES:
                    f.round_bytes_up += up
                    f.round_bytes_down += down
        f.sampled_peak_rss = sampled_rss.get(f.name, 0)
    return sorted(figures.values(), key=lambda f: f.name)
