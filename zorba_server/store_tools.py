"""`zorba-server check` and `zorba-server backup`: the store's own checks, and a consistent
copy, without starting a server.

`check` runs what a server runs on open (`storage/integrity.py`) plus SQLite's page-level
`integrity_check`, on a read-only connection: nothing is written. `backup` copies a SQLite
database with SQLite's online backup API (consistent even while a server writes to it), checks
the copy, and refuses to overwrite a file. A PostgreSQL run is backed up with `pg_dump`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from zorba_server.storage import StoreError, integrity, is_postgres_url
from zorba_server.storage.sqlite import check_existing


def _summary(where: str, checked: integrity.Checked | None) -> str:
    if checked is None or checked.run_id is None:
        return f"{where}: ok (no run yet)"
    return (f"{where}: ok (run {checked.run_id}, version {checked.version}, {checked.rounds} "
            f"rounds, {checked.increments} increments; the table is the sum of its increments)")


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StoreError(f"no SQLite database at {path}: pass the --db the server runs on")
    if path.stat().st_size == 0:
        raise integrity.refuse(f"the SQLite database {path}", "the file is empty (0 bytes)")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)


def check_sqlite(path: Path) -> str:
    where = f"the SQLite database {path}"
    conn = _open_read_only(path)
    try:
        checked = check_existing(conn, where)
        pages = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if pages != ["ok"]:
            raise integrity.refuse(where, f"SQLite's integrity check failed ({pages[0]})")
    except sqlite3.DatabaseError as exc:
        raise integrity.refuse(where, f"SQLite cannot read it ({exc})") from None
    finally:
        conn.close()
    return _summary(where, checked)


def check_postgres(conninfo: str) -> str:
    import psycopg

    try:
        with psycopg.connect(conninfo, autocommit=True) as raw:
            where = f"PostgreSQL database {raw.info.dbname!r}"
            from zorba_server.storage.postgres import PgConnection

            conn = PgConnection(raw)
            conn.execute("BEGIN READ ONLY")
            tables = {name for (name,) in conn.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()")}
            integrity.check_tables(where, tables)
            checked = None
            if tables:
                integrity.read_schema_version(conn, where)
                checked = integrity.check_alpha(conn, where)
            conn.execute("ROLLBACK")
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the PostgreSQL database: {exc}".splitlines()[0]) from None
    return _summary(where, checked)


def check(location: str) -> str:
    """One line: the database is sound (what it holds), or a StoreError saying what is wrong."""
    return check_postgres(location) if is_postgres_url(location) else check_sqlite(Path(location))


def backup(location: str, out: Path) -> str:
    """Copy a sound SQLite database to `out` (a new file) and check the copy; one line."""
    if is_postgres_url(location):
        raise StoreError("a PostgreSQL run is backed up by PostgreSQL's own tool: "
                         "pg_dump --format=custom --file OUT " + location.split("?")[0])
    if out.exists():
        raise StoreError(f"{out} exists: name a new file for the backup")
    source = _open_read_only(Path(location))
    try:
        check_existing(source, f"the SQLite database {location}")
        target = sqlite3.connect(str(out))
        try:
            source.backup(target)
        finally:
            target.close()
    except sqlite3.Error as exc:
        out.unlink(missing_ok=True)
        raise StoreError(f"the backup of {location} to {out} failed: {exc}") from None
    finally:
        source.close()
    return f"backed up {location} to {out}; " + check_sqlite(out)
