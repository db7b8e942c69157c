"""One server per run (issue 27): a second server on the same database is refused with one
line; a busy port or a missing TLS file is one line naming it, before any run is created."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from aiohttp import web
from postgres_server import PostgresServer, postgres_server  # noqa: F401 (fixture)
from server_fakes import config_dict

from zorba_server import run_lock
from zorba_server.app import create_app
from zorba_server.cli import main
from zorba_server.config import config_from_dict
from zorba_server.run_lock import RunLockedError


async def started(location: str | Path) -> web.AppRunner:
    runner = web.AppRunner(create_app(config_from_dict(config_dict(location))))  # type: ignore[arg-type]
    await runner.setup()
    return runner


async def second_is_refused_until_the_first_stops(location: str | Path, match: str) -> None:
    first = await started(location)
    try:
        with pytest.raises(RunLockedError, match=match) as caught:
            await started(location)
        assert "\n" not in str(caught.value) and "stop that server first" in str(caught.value)
    finally:
        await first.cleanup()
    again = await started(location)  # the lock went with the first server
    await again.cleanup()


@pytest.mark.asyncio
async def test_a_second_server_on_one_sqlite_run_is_refused(tmp_path: Path) -> None:
    await second_is_refused_until_the_first_stops(tmp_path / "run.sqlite3", r"another zorba-server \(pid \d+")


@pytest.mark.asyncio
async def test_a_second_server_on_one_postgres_run_is_refused(
        postgres_server: PostgresServer) -> None:  # noqa: F811
    await second_is_refused_until_the_first_stops(postgres_server.new_database_url(),
                                                  "another zorba-server")


def test_a_dead_servers_postgres_lock_is_taken_once_its_session_ends(
        postgres_server: PostgresServer) -> None:  # noqa: F811
    """A server that died never unlocked: PostgreSQL ends its session after the client has
    gone, and the next server waits for that instead of refusing the run."""
    import psycopg

    url = postgres_server.new_database_url()
    dead = psycopg.connect(url, autocommit=True)
    dead.execute("SELECT pg_advisory_lock(%s)", (run_lock.PG_LOCK_KEY,))
    dead.close()  # no unlock: the lock goes when the backend ends, asynchronously
    lock = run_lock.acquire(url)
    try:
        with psycopg.connect(url, autocommit=True) as other:
            row = other.execute("SELECT pg_try_advisory_lock(%s)", (run_lock.PG_LOCK_KEY,)).fetchone()
            assert row is not None and row[0] is False  # held: by `lock`
    finally:
        lock.release()
    with psycopg.connect(url, autocommit=True) as after:
        row = after.execute("SELECT pg_try_advisory_lock(%s)", (run_lock.PG_LOCK_KEY,)).fetchone()
        assert row is not None and row[0] is True  # released at once, not at the session's end


def run_main(args: list[str]) -> int:
    return main([*args, "--log-level", "WARNING"])


@pytest.mark.asyncio
async def test_the_cli_refuses_a_locked_run_a_busy_port_and_a_missing_tls_file_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZORBA_ENROLMENT_SECRET", "s" * 16)
    db = tmp_path / "run.sqlite3"
    # A busy port: the database is never created.
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code = await asyncio.to_thread(run_main, ["--db", str(db), "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"127.0.0.1:{port}" in err and "in use" in err
    assert not db.exists()
    # A missing TLS file is named.
    code = await asyncio.to_thread(run_main, ["--db", str(db), "--port", "0", "--tls-cert",
                                              str(tmp_path / "c.pem"), "--tls-key",
                                              str(tmp_path / "k.pem")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "c.pem (--tls-cert) does not exist" in err
    assert not db.exists()
    # A run another server holds.
    held = run_lock.acquire(str(db))
    try:
        code = await asyncio.to_thread(run_main, ["--db", str(db), "--port", "0"])
    finally:
        held.release()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "served by another zorba-server" in err
    assert not db.exists()
