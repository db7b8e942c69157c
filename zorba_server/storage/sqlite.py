"""The embedded default store: SQLite in WAL mode, one connection, group commit.

Statements run on the event loop (they take microseconds) and only COMMIT, which waits on the
disk, runs on the committer's helper thread (see `committer.py` for why).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from zorba_server.storage import integrity, sql
from zorba_server.storage.committer import Committer
from zorba_server.storage.errors import DuplicateError, StoreError, StoreUnavailableError
from zorba_server.storage.sql_store import SqlStore

SCHEMA = sql.schema(blob="BLOB", real="REAL", bigint="INTEGER")
"""The tables (SQLite's INTEGER is 64 bits wide)."""


def connect(path: str | Path, synchronous: str = "full") -> sqlite3.Connection:
    """Open (creating if needed) the database; transactions are explicit (BEGIN/COMMIT).

    An existing database is checked before anything is written to it (`integrity.py`): a
    0-byte file, missing tables, an unreadable schema version, or a coefficient table that
    is not finite or not the sum of its increments is a CorruptStoreError."""
    where = f"the SQLite database {path}"
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise integrity.refuse(where, "the file is empty (0 bytes), not a run database")
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        check_existing(conn, where)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        sql.check_schema_version(conn, str(path), {
            1: lambda: _rebuild_rounds_table(conn, 2),
            2: lambda: _stamped(conn, 3, lambda: sql.add_report_bytes(conn, "INTEGER")),
            3: lambda: _stamped(conn, 4, lambda: sql.add_guard_outliers(conn)),
            4: lambda: _rebuild_rounds_table(conn, 5)})
    except BaseException:
        conn.close()
        raise
    return conn


def check_existing(conn: sqlite3.Connection, where: str) -> integrity.Checked | None:
    """The checks of `integrity.py` on a database that holds a run (None: a new one)."""
    try:
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:  # "file is not a database", and the like
        raise integrity.refuse(where, f"SQLite cannot read it ({exc})") from None
    integrity.check_tables(where, tables)
    if not tables:
        return None
    integrity.read_schema_version(conn, where)
    try:
        return integrity.check_alpha(conn, where)
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed"
        raise integrity.refuse(where, f"SQLite cannot read it ({exc})") from None


def _rebuild_rounds_table(conn: sqlite3.Connection, version: int) -> None:
    """Schema 1 -> 2 and 4 -> 5 (a round status more): SQLite cannot alter a CHECK
    constraint, so the rounds table is rebuilt with the new one and its rows copied, in one
    transaction with the stamp `version` (SQLite's documented procedure: foreign keys off
    meanwhile, checked before the commit)."""
    start = SCHEMA.index("CREATE TABLE IF NOT EXISTS rounds (")
    create = SCHEMA[start : SCHEMA.index(";", start)]
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(create.replace("CREATE TABLE IF NOT EXISTS rounds (", "CREATE TABLE rounds_v2 ("))
        conn.execute("INSERT INTO rounds_v2 SELECT * FROM rounds")
        conn.execute("DROP TABLE rounds")
        conn.execute("ALTER TABLE rounds_v2 RENAME TO rounds")
        if conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
            raise sqlite3.IntegrityError("rebuilding the rounds table broke a foreign key")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.execute("PRAGMA foreign_keys=ON")


def _stamped(conn: sqlite3.Connection, version: int, change: Callable[[], None]) -> None:
    """A step to schema `version` in one transaction with its stamp (SQLite's DDL is
    transactional): a crash leaves the old schema or the new one, never new columns under the
    old stamp."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        change()
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def domain_error(exc: Exception) -> Exception:
    """sqlite3's exceptions as the store's own; anything else as it is."""
    if isinstance(exc, StoreError) or not isinstance(exc, sqlite3.Error):
        return exc
    if type(exc) is sqlite3.DatabaseError:  # "database disk image is malformed", not a busy disk
        return integrity.refuse("the SQLite database", f"SQLite cannot read it ({exc})")
    if isinstance(exc, sqlite3.IntegrityError):
        if str(exc).startswith("UNIQUE constraint failed"):
            return DuplicateError(f"already stored: {exc}")
        return StoreError(f"the database refused a row that breaks its constraints: {exc}")
    return StoreUnavailableError(f"SQLite failed ({exc}): nothing of this write was saved; retry")


class SqliteStore(SqlStore):
    """`Store` on a SQLite file: `await SqliteStore.open(path)`, then `await store.close()`."""

    @classmethod
    async def open(cls, path: str | Path, synchronous: str = "full") -> SqliteStore:
        try:
            conn = connect(path, synchronous)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open the SQLite database {path}: {exc}") from exc
        committer = Committer(conn, begin="BEGIN IMMEDIATE", statements_on_thread=False)
        committer.start()
        return cls(committer, conn.close, domain_error)
