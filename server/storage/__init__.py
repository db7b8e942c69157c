"""The run's durable record: the `Store` protocol, its errors, and its two implementations.

    store = await SqliteStore.open("run.sqlite3")          # the embedded default
    store = await PostgresStore.open("postgresql://...")    # psycopg 3, PostgreSQL >= 13

`PostgresStore` is imported on first use, so a SQLite server never loads psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zorba_server.storage.errors import (
    AlreadyPinnedError,
    DuplicateError,
    RoundNotOpenError,
    SchemaMismatchError,
    StoreError,
    StoreUnavailableError,
)

# Op .. run_batch and connect are transitional: the coordinator still drives the SQLite
# statements through its own committer (`storage.load(conn, ...)`); they leave this list once
# it holds a `Store`.
from zorba_server.storage.sql import (
    Op,
    begin_batch,
    close_round,
    commit,
    create_run,
    find_report,
    insert_client,
    insert_report,
    insert_round,
    load,
    pin_model,
    run_batch,
)
from zorba_server.storage.sqlite import SqliteStore, connect
from zorba_server.storage.store import Snapshot, Store, StoredClient, StoredReport, StoredRound

if TYPE_CHECKING:
    from zorba_server.storage.postgres import PostgresStore

__all__ = [
    "AlreadyPinnedError", "DuplicateError", "PostgresStore", "RoundNotOpenError",
    "SchemaMismatchError", "Snapshot", "SqliteStore", "Store", "StoreError",
    "StoreUnavailableError", "StoredClient", "StoredReport", "StoredRound",
    "Op", "begin_batch", "close_round", "commit", "connect", "create_run", "find_report",
    "insert_client", "insert_report", "insert_round", "load", "pin_model", "run_batch",
]


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":
        from zorba_server.storage.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
