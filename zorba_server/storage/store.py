"""The server's durable record behind one small protocol: what the server stores, not how.

`Store` is what the server and the research readers (`zorba_lab/`) call. Its methods speak the
server's own types (plans, reports, deltas, alpha) and raise only `storage.errors`; no
database type crosses it. Two implementations: `SqliteStore` (the embedded default) and
`PostgresStore` (for operators who already run PostgreSQL), both over one set of statements
(`sql.py`) and one group committer.

Ordering: every write is queued when the method is *called*, not when its result is awaited,
so writes issued in one order commit in that order (a report queued before a round's close
is stored before the close). Results arrive only after the commit: an acknowledgement sent
after awaiting one is durable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import AlphaDelta, DeviceProfile
from zorba_server.rounds import ReceivedReport, RoundPlan
from zorba_server.safety_state import SafetyState
from zorba_server.traffic import RoundBytes

ALL_DELTAS = 1 << 62
"""`Store.load(ALL_DELTAS)`: every increment of the run."""


@dataclass
class StoredClient:
    client_id: str
    token_hash: bytes
    profile: DeviceProfile
    registered_at: float
    calibration: float
    left_at: float | None = None
    """When it said it left (POST /v1/leave), unless it came back since."""
    guard_outlier_rounds: int = 0
    """Rounds in which the loss guard left its check loss out as implausible."""


@dataclass
class StoredRound:
    plan: RoundPlan
    status: str
    closed_at: float | None
    reports: int
    loss: float | None
    message: str


@dataclass
class Snapshot:
    run_id: str | None
    seed: int
    pool_size: int
    created_at: float
    model_fingerprint: str | None
    footprint: ModelFootprint | None
    version: int
    alpha: np.ndarray | None
    clients: list[StoredClient]
    rounds: list[StoredRound]
    open_reports: list[ReceivedReport]
    """Reports of the open round (if any)."""
    deltas: list[AlphaDelta]
    """The most recent increments, oldest first."""
    client_reports: dict[str, ClientReports] = field(default_factory=dict)
    """What each client has reported over the run (for the counters a restart must keep)."""
    safety: SafetyState | None = None
    """What the safety rules remembered at the last close (None: nothing stored: no round
    closed yet, or a database of an older server)."""


@dataclass(frozen=True)
class ClientReports:
    count: int
    """Reports stored (acknowledged), every round."""
    last_loss: float
    last_peak_bytes: int
    last_round_bytes: RoundBytes | None = None
    """Body bytes of the round its last report ended (None: stored before schema 3)."""


@dataclass(frozen=True)
class ModelPin:
    """The run's model as the first client fixes it: fingerprint, footprint, zero alpha."""

    fingerprint: str
    footprint: ModelFootprint
    alpha: np.ndarray


@dataclass(frozen=True)
class StoredReport:
    """Where a report was stored, for answering a retry with its original acknowledgement."""

    round: int
    body_hash: bytes
    received_at: float


class CommitStats(Protocol):
    batches: int
    """Transactions committed."""
    ops: int
    """Writes grouped into them."""
    busy_s: float
    """Time spent in transactions (mostly waiting on the disk)."""


class Store(Protocol):
    """The run's durable record. Open with the implementation's `open`, end with `close`."""

    @property
    def stats(self) -> CommitStats: ...

    async def close(self) -> None:
        """Finish the queued writes, then close the database."""

    def load(self, recent_deltas: int) -> Awaitable[Snapshot]:
        """Everything a restarted server needs, with the `recent_deltas` latest increments
        (`ALL_DELTAS`: every one, as a reader replaying the run wants)."""

    def create_run(self, run_id: str, seed: int, pool_size: int,
                   created_at: float) -> Awaitable[None]: ...

    def pin_model(self, fingerprint: str, footprint: ModelFootprint,
                  alpha: np.ndarray) -> Awaitable[None]:
        """Fix the run's model and its zero alpha; AlreadyPinnedError the second time."""

    def insert_client(self, client_id: str, token_hash: bytes, profile: DeviceProfile,
                      registered_at: float, pin: ModelPin | None = None) -> Awaitable[None]:
        """DuplicateError for a client id or token hash stored before. With `pin` (the first
        client) the model is pinned in the same transaction: AlreadyPinnedError, and no
        client stored, when it was pinned before."""

    def set_left(self, client_id: str, left_at: float | None) -> Awaitable[None]:
        """Record that a client left at `left_at`, or (None) that it came back."""

    def insert_round(self, plan: RoundPlan) -> Awaitable[None]:
        """Open a round."""

    def insert_report(self, round_: int, received: ReceivedReport,
                      traffic: RoundBytes | None = None) -> Awaitable[None]:
        """Store a report once, with `traffic`, the body bytes of the client's round it ends
        (`traffic.py`): DuplicateError for a second report of the client in the round or a
        reused idempotency key, RoundNotOpenError when the round is not open."""

    def find_report(self, client_id: str, idempotency_key: str) -> Awaitable[StoredReport | None]:
        ...

    def read_reports(self) -> Awaitable[list[tuple[int, ReceivedReport]]]:
        """Every stored report as (round, report), by round then client: for the research
        readers (the quickstart's figures, replay), not for the server's hot path."""

    def close_round(self, round_: int, status: str, closed_at: float, reports: int,
                    loss: float | None, message: str, *, delta: AlphaDelta | None = None,
                    alpha: np.ndarray | None = None,
                    calibrations: dict[str, float] | None = None,
                    guard_outliers: Sequence[str] = (),
                    safety: SafetyState | None = None) -> Awaitable[None]:
        """Close a round once (RoundNotOpenError after); an applied one writes its increment,
        the new alpha and the clients' calibrations in the same transaction, and each client
        in `guard_outliers` counts one more outlier round (`guard_outlier_rounds`); `safety`,
        what the safety rules remember after the close, replaces the stored one."""
