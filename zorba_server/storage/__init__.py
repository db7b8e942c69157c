"""The run's durable record: the `Store` protocol, its errors, and its two implementations.

    store = await open_store("run.sqlite3")                 # SQLite, the embedded default
    store = await open_store("postgresql://user@host/db")   # PostgreSQL (psycopg 3, >= 13)

`PostgresStore` is imported on first use, so a SQLite server never loads psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zorba_server.storage.errors import (
    AlreadyPinnedError,
    CorruptStoreError,
    DuplicateError,
    RoundNotOpenError,
    SchemaMismatchError,
    StoreError,
    StoreUnavailableError,
)
from zorba_server.storage.sqlite import SqliteStore
from zorba_server.storage.store import (
    ALL_DELTAS,
    ModelPin,
    Snapshot,
    Store,
    StoredClient,
    StoredReport,
    StoredRound,
)

if TYPE_CHECKING:
    from zorba_server.storage.postgres import PostgresStore

__all__ = [
    "ALL_DELTAS", "AlreadyPinnedError", "CorruptStoreError", "DuplicateError", "ModelPin",
    "PostgresStore", "RoundNotOpenError",
    "SchemaMismatchError", "Snapshot", "SqliteStore", "Store", "StoreError",
    "StoreUnavailableError", "StoredClient", "StoredReport", "StoredRound", "is_postgres_url",
    "open_store",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str) -> bool:
    """`storage.path` names a PostgreSQL database (a libpq URL), not a SQLite file."""
    return location.startswith(POSTGRES_SCHEMES)


async def open_store(location: str, synchronous: str = "full") -> Store:
    """The store `storage.path` (or `zorba-server --db`) names: a `postgresql://` URL opens
    PostgreSQL, anything else is the path of a SQLite file (`synchronous` applies to it only:
    PostgreSQL's durability is its server's own setting)."""
    if is_postgres_url(location):
        from zorba_server.storage.postgres import PostgresStore

        return await PostgresStore.open(location)
    return await SqliteStore.open(location, synchronous)


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":
        from zorba_server.storage.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
