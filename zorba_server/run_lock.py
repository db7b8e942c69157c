"""One server per run: an exclusive lock on the run's database, held while a server serves it.

Two servers on one database both resumed the run and wrote to it (issue 27). A server takes
the lock before it opens, checks or resumes anything, and holds it until it has stopped:

- SQLite: `fcntl.flock` on a file beside the database (`<db>.lock`, holding the owner's pid
  for the refusal's message). The kernel drops the lock when the process dies, so a crashed
  server never leaves a stale lock behind.
- PostgreSQL: a session advisory lock on a connection of its own. A server that stops
  unlocks it before closing that connection: PostgreSQL ends a closed session's backend
  after the client has gone, so a lock left to the session's end could still be held when a
  restarted server asks for it. A server that died leaves it to that asynchronous end, so a
  new server waits up to RELEASE_WAIT_S for a held lock (it has it the moment the session
  ends) before it refuses.

Readers (`zorba_lab`, `zorba-server check`) take no lock: they do not write.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zorba_server.storage import StoreError, is_postgres_url

PG_LOCK_KEY = 7267012
"""The advisory lock key of a run (advisory locks are per database: one run per database)."""

RELEASE_WAIT_S = 10
"""How long a new server waits for a held PostgreSQL lock before it refuses: time enough for
the backend of a server that just died to end; a server that is running holds it for longer."""


class RunLockedError(StoreError):
    """Another server holds the run's lock."""


@dataclass
class RunLock:
    """A held lock; `release()` gives it back (idempotent)."""

    handle: Any
    kind: str

    def release(self) -> None:
        if self.handle is None:
            return
        if self.kind == "file":
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
        else:
            _unlock_postgres(self.handle)
        self.handle.close()
        self.handle = None


def _unlock_postgres(conn: Any) -> None:
    """Give the advisory lock back now, not when PostgreSQL gets round to ending the session."""
    import psycopg

    try:
        conn.execute("SELECT pg_advisory_unlock(%s)", (PG_LOCK_KEY,))
    except psycopg.Error:
        pass  # the session is gone already, and its lock with it


def acquire(location: str) -> RunLock:
    """Lock the run stored at `location` (a SQLite path or a PostgreSQL URL), or
    RunLockedError when another server holds it."""
    return _acquire_postgres(location) if is_postgres_url(location) else _acquire_file(location)


def lock_path(location: str) -> Path:
    return Path(f"{location}.lock")


def _acquire_file(location: str) -> RunLock:
    path = lock_path(location)
    try:
        handle = open(path, "a+")  # noqa: SIM115 (held open while the server runs)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {path} beside the database: {exc.strerror}; "
                         "give --db a directory the server may write to") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunLockedError(
            f"the run in {location} is served by another zorba-server (pid {holder}, lock "
            f"{path}): stop that server first, or give this one another --db") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return RunLock(handle, "file")


def _acquire_postgres(location: str) -> RunLock:
    import psycopg

    try:
        conn = psycopg.connect(location, autocommit=True)
    except psycopg.Error as exc:
        raise StoreError(f"cannot open the PostgreSQL database: {exc}".splitlines()[0]) from None
    if not _wait_for_lock(conn):
        holder = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (PG_LOCK_KEY,)).fetchone()
        name = conn.info.dbname
        conn.close()
        raise RunLockedError(
            f"the run in PostgreSQL database {name!r} is served by another zorba-server "
            f"(backend pid {holder[0] if holder else 'unknown'}): stop that server first, or "
            "give this one another database")
    return RunLock(conn, "postgres")


def _wait_for_lock(conn: Any) -> bool:
    """Wait up to RELEASE_WAIT_S for the lock (returning as soon as it is free): True once held."""
    import psycopg

    conn.execute(f"SET lock_timeout = {RELEASE_WAIT_S * 1000}")
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (PG_LOCK_KEY,))
        return True
    except psycopg.errors.LockNotAvailable:
        return False
    finally:
        conn.execute("SET lock_timeout = 0")
