"""The second store: PostgreSQL through psycopg 3, for operators who already run it.

The same statements as SQLite (`sql.py`, `?` placeholders rewritten to psycopg's `%s`) and
the same group committer: many writes, one transaction. Each statement is a round trip to
the database server, so the whole batch runs on the committer's thread rather than on the
event loop. The connection is in autocommit mode so that the committer's explicit
BEGIN / SAVEPOINT / COMMIT are the transactions, exactly as with SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from zorba_server.storage import integrity, sql
from zorba_server.storage.committer import Committer
from zorba_server.storage.errors import DuplicateError, StoreError, StoreUnavailableError
from zorba_server.storage.sql_store import SqlStore

SCHEMA = sql.schema(blob="BYTEA", real="DOUBLE PRECISION", bigint="BIGINT")


class PgConnection:
    """A psycopg connection that speaks `sql.Connection`: `?` placeholders, `in_transaction`."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, statement: str, parameters: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        # Our statements hold no literal '?' or '%', so the rewrite is exact.
        return self.raw.execute(statement.replace("?", "%s"), tuple(parameters))  # type: ignore[arg-type]

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


def connect(conninfo: str) -> PgConnection:
    """Connect, create the tables if needed and check the schema version."""
    raw = psycopg.connect(conninfo, autocommit=True)
    conn = PgConnection(raw)
    try:
        conn.execute("BEGIN")
        # One server at a time creates the tables: concurrent CREATE IF NOT EXISTS can clash.
        conn.execute("SELECT pg_advisory_xact_lock(7267011)")
        where = f"PostgreSQL database {raw.info.dbname!r}"
        tables = {name for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
        integrity.check_tables(where, tables)
        if tables:
            integrity.read_schema_version(conn, where)
            integrity.check_alpha(conn, where)
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        # Migrations run inside this transaction: a crash leaves the old schema whole.
        sql.check_schema_version(conn, where,
                                 {1: lambda: _widen_round_status(conn),
                                  2: lambda: sql.add_report_bytes(conn, "BIGINT"),
                                  3: lambda: sql.add_guard_outliers(conn),
                                  4: lambda: _widen_round_status(conn)})
        conn.execute("COMMIT")
    except BaseException:
        raw.close()
        raise
    return conn


def _widen_round_status(conn: PgConnection) -> None:
    """Schema 1 -> 2 and 4 -> 5 (inside connect's transaction): the rounds table's status
    constraint admits every status of ROUND_STATUS_CHECK (`rejected`, then `checked`)."""
    conn.execute("ALTER TABLE rounds DROP CONSTRAINT IF EXISTS rounds_status_check")
    conn.execute(f"ALTER TABLE rounds ADD CONSTRAINT rounds_status_check {sql.ROUND_STATUS_CHECK}")


def domain_error(exc: Exception) -> Exception:
    """psycopg's exceptions as the store's own; anything else as it is."""
    if isinstance(exc, StoreError) or not isinstance(exc, psycopg.Error):
        return exc
    if isinstance(exc, pg_errors.UniqueViolation):
        return DuplicateError(f"already stored: {exc}")
    if isinstance(exc, pg_errors.IntegrityError):
        return StoreError(f"the database refused a row that breaks its constraints: {exc}")
    return StoreUnavailableError(f"PostgreSQL failed ({exc}): nothing of this write was saved; "
                                 "retry")


class PostgresStore(SqlStore):
    """`Store` on a PostgreSQL database: `await PostgresStore.open("postgresql://...")`."""

    @classmethod
    async def open(cls, conninfo: str) -> PostgresStore:
        try:
            conn = connect(conninfo)
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"cannot open the PostgreSQL database: {exc}") from exc
        committer = Committer(conn, begin="BEGIN", statements_on_thread=True)
        committer.start()
        return cls(committer, conn.close, domain_error)
