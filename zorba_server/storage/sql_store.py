"""`Store` over the shared statements and the group committer: what SQLite and PostgreSQL
have in common. Each implementation supplies its connection, its committer settings and the
mapping of its driver's exceptions to `storage.errors`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import AlphaDelta, DeviceProfile
from zorba_server.rounds import ReceivedReport, RoundPlan
from zorba_server.safety_state import SafetyState
from zorba_server.storage import sql
from zorba_server.storage.committer import Committer
from zorba_server.storage.store import CommitStats, ModelPin, Snapshot, StoredReport
from zorba_server.traffic import RoundBytes


class SqlStore:
    def __init__(self, committer: Committer, close_connection: Callable[[], None],
                 domain_error: Callable[[Exception], Exception]) -> None:
        self._committer = committer
        self._close_connection = close_connection
        self._domain_error = domain_error

    @property
    def stats(self) -> CommitStats:
        return self._committer

    async def close(self) -> None:
        await self._committer.stop()
        self._close_connection()

    def _write(self, op: sql.Op) -> Awaitable[Any]:
        # Queued now (call order is commit order). The caller gets a future of its own: its
        # cancellation (a client gone) does not reach the write, which may already be durable.
        # A plain future, not a task around a coroutine: a report's write is one of
        # thousands a second, and the task, its steps and a shield cost more than the write.
        queued = self._committer.enqueue(op)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queued.add_done_callback(partial(self._settle, answer))
        return answer

    def _settle(self, answer: asyncio.Future[Any], queued: asyncio.Future[Any]) -> None:
        """`answer` takes `queued`'s result, or its error as a domain error (`_translated`)."""
        if answer.cancelled():
            return
        if queued.cancelled():
            answer.cancel()
            return
        exc = queued.exception()
        if exc is None:
            answer.set_result(queued.result())
            return
        mapped = self._domain_error(exc) if isinstance(exc, Exception) else exc
        if mapped is not exc:
            mapped.__cause__ = exc
        answer.set_exception(mapped)

    async def _translated(self, result: Awaitable[Any]) -> Any:
        try:
            return await result
        except Exception as exc:
            mapped = self._domain_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def load(self, recent_deltas: int) -> Awaitable[Snapshot]:
        return self._write(partial(sql.load, recent_deltas=recent_deltas))

    def create_run(self, run_id: str, seed: int, pool_size: int,
                   created_at: float) -> Awaitable[None]:
        return self._write(partial(sql.create_run, run_id=run_id, seed=seed, pool_size=pool_size,
                                   created_at=created_at))

    def pin_model(self, fingerprint: str, footprint: ModelFootprint,
                  alpha: np.ndarray) -> Awaitable[None]:
        return self._write(partial(sql.pin_model, fingerprint=fingerprint, footprint=footprint,
                                   alpha=alpha))

    def insert_client(self, client_id: str, token_hash: bytes, profile: DeviceProfile,
                      registered_at: float, pin: ModelPin | None = None) -> Awaitable[None]:
        return self._write(partial(sql.insert_client, client_id=client_id, token_hash=token_hash,
                                   profile=profile, registered_at=registered_at, pin=pin))

    def set_left(self, client_id: str, left_at: float | None) -> Awaitable[None]:
        return self._write(partial(sql.set_left, client_id=client_id, left_at=left_at))

    def insert_round(self, plan: RoundPlan) -> Awaitable[None]:
        return self._write(partial(sql.insert_round, plan=plan))

    def insert_report(self, round_: int, received: ReceivedReport,
                      traffic: RoundBytes | None = None) -> Awaitable[None]:
        return self._write(partial(sql.insert_report, round_=round_, received=received,
                                   traffic=traffic))

    def find_report(self, client_id: str, idempotency_key: str) -> Awaitable[StoredReport | None]:
        return self._translated(self._find_report(client_id, idempotency_key))

    async def _find_report(self, client_id: str, idempotency_key: str) -> StoredReport | None:
        found = await asyncio.shield(self._committer.enqueue(
            partial(sql.find_report, client_id=client_id, idempotency_key=idempotency_key)))
        return None if found is None else StoredReport(*found)

    def read_reports(self) -> Awaitable[list[tuple[int, ReceivedReport]]]:
        return self._write(sql.read_reports)

    def close_round(self, round_: int, status: str, closed_at: float, reports: int,
                    loss: float | None, message: str, *, delta: AlphaDelta | None = None,
                    alpha: np.ndarray | None = None,
                    calibrations: dict[str, float] | None = None,
                    guard_outliers: Sequence[str] = (),
                    safety: SafetyState | None = None) -> Awaitable[None]:
        return self._write(partial(sql.close_round, round_=round_, status=status,
                                   closed_at=closed_at, reports=reports, loss=loss,
                                   message=message, delta=delta, alpha=alpha,
                                   calibrations=calibrations, guard_outliers=guard_outliers,
                                   safety=safety))
