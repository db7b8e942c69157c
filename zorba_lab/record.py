"""A finished (or running) run's record, read through the server's `Store`.

Research tooling (the quickstart's figures, the accuracy replay, the process comparison) reads
what the server stored through the same protocol the server writes it with, so it works on
either store (a SQLite file or a `postgresql://` URL) and never depends on the tables.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from zorba_common.errors import ZorbaError
from zorba_server.rounds import ReceivedReport
from zorba_server.storage import ALL_DELTAS, Snapshot, is_postgres_url, open_store


class RecordError(ZorbaError):
    """There is no run record where one was expected."""


@dataclass(frozen=True)
class RunRecord:
    snapshot: Snapshot
    """Run, clients, rounds and every increment (`Store.load(ALL_DELTAS)`)."""
    reports: list[tuple[int, ReceivedReport]]
    """Every stored report as (round, report), by round then client."""


def read_record(location: str | Path) -> RunRecord:
    """The whole record at `location` (a SQLite file or a PostgreSQL URL), read once."""
    where = str(location)
    if not is_postgres_url(where) and not Path(where).exists():
        # Opening a store creates its tables: a reader must not leave an empty database behind.
        raise RecordError(f"no server database at {where}")
    record = asyncio.run(_read(where))
    if record.snapshot.run_id is None:
        raise RecordError(f"{where} holds no run: the server never started one")
    return record


async def _read(location: str) -> RunRecord:
    store = await open_store(location)
    try:
        # Queued together (usually one transaction); a finished run does not change anyway.
        snapshot, reports = store.load(ALL_DELTAS), store.read_reports()
        return RunRecord(await snapshot, await reports)
    finally:
        await store.close()
