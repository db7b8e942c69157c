"""A store that checks itself (issue 27): a damaged run database is refused on open with one
line naming it and what to do, and nothing is written to it; a sound one opens."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from postgres_server import PostgresServer, postgres_server  # noqa: F401 (fixture)
from server_fakes import FOOTPRINT, profile

from zorba_common.messages import AlphaDelta, HyperParams
from zorba_server.aggregation import RoundDelta, apply_delta
from zorba_server.rounds import APPLIED, REJECTED, ClientPlan, RoundPlan
from zorba_server.storage import CorruptStoreError, SqliteStore, Store

pytestmark = pytest.mark.asyncio
POOL = 8


def plan(round_: int, base: int) -> RoundPlan:
    return RoundPlan(round_, base, 0.0, 5.0, HyperParams(0.1, 1e-3, 8, 64), (3, 4),
                     {"c-0": ClientPlan((0,), 2)})


async def write_run(store: Store, rounds: int = 3) -> np.ndarray:
    """A run with `rounds` applied rounds and a rollback, as the engine writes them."""
    await store.create_run("run", 1, POOL, 0.0)
    alpha = np.zeros((POOL, 4))
    await store.pin_model("fp", FOOTPRINT, alpha)
    await store.insert_client("c-0", b"hash", profile(), 0.0)
    rng = np.random.default_rng(0)
    version = 0
    for r in range(1, rounds + 2):
        await store.insert_round(plan(r, version))
        if r <= rounds:
            change = RoundDelta((3, 4), (0, 2), rng.normal(size=(2, 2)).astype(np.float32))
            status = APPLIED
        else:  # the loss guard's rollback to zeros
            change = RoundDelta(tuple(range(POOL)), (0, 1, 2, 3), (-alpha).astype(np.float32))
            status = REJECTED
        version += 1
        delta = AlphaDelta.from_matrix(version, r, change.pool_indices, change.blocks,
                                       change.values)
        alpha = apply_delta(alpha, change)
        await store.close_round(r, status, 1.0, 1, 0.5, "", delta=delta, alpha=alpha)
    return alpha


async def sqlite_run(path: Path) -> np.ndarray:
    store = await SqliteStore.open(path)
    try:
        return await write_run(store)
    finally:
        await store.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def refused(path: Path, match: str) -> str:
    """Opening `path` is refused, with one line naming the file; the file is unchanged."""
    before = digest(path)
    with pytest.raises(CorruptStoreError, match=match) as caught:
        await SqliteStore.open(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "zorba-server backup" in message
    assert digest(path) == before
    return message


def damage(path: Path, statements: Sequence[str], params: Sequence[Any] = ()) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement, params) if "?" in statement else conn.execute(statement)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def test_a_sound_run_database_opens_and_its_table_is_the_sum_of_its_increments(
        tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite3"
    alpha = await sqlite_run(path)
    store = await SqliteStore.open(path)
    snap = await store.load(10)
    await store.close()
    assert snap.version == 4 and snap.alpha is not None
    np.testing.assert_array_equal(snap.alpha, alpha)


async def test_a_zero_byte_file_is_refused_not_made_a_new_run(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    path.write_bytes(b"")
    await refused(path, "empty")
    assert path.stat().st_size == 0


async def test_a_file_that_is_no_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(b"not a database at all" * 100)
    await refused(path, "cannot read")


async def test_nan_cells_in_the_table_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite3"
    alpha = await sqlite_run(path)
    alpha[0, 0] = np.nan
    damage(path, ["UPDATE run SET alpha = ? WHERE id = 1"],
           (np.ascontiguousarray(alpha, "<f8").tobytes(),))
    await refused(path, "1 NaN or infinite cells")


async def test_a_finite_table_that_differs_from_its_increments_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite3"
    alpha = await sqlite_run(path)
    alpha[5, 1] += 1e-3
    damage(path, ["UPDATE run SET alpha = ? WHERE id = 1"],
           (np.ascontiguousarray(alpha, "<f8").tobytes(),))
    await refused(path, "1 cells of the coefficient table differ from the sum of its 4")


async def test_a_damaged_increment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite3"
    await sqlite_run(path)
    conn = sqlite3.connect(str(path))
    blob = bytearray(conn.execute("SELECT delta FROM increments WHERE version = 2").fetchone()[0])
    conn.close()
    blob[-3] ^= 0x40  # a bit of the last float32 value
    damage(path, ["UPDATE increments SET delta = ? WHERE version = 2"], (bytes(blob),))
    await refused(path, "differ from the sum|increment 2")


async def test_a_missing_increment_or_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite3"
    await sqlite_run(path)
    damage(path, ["DELETE FROM increments WHERE version = 2"])
    await refused(path, "increment 2 is missing")
    damage(path, ["DROP TABLE increments"])
    await refused(path, "increments are missing")


async def test_an_unreadable_schema_version_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite3"
    await sqlite_run(path)
    damage(path, ["UPDATE meta SET value = 'abc' WHERE key = 'schema_version'"])
    await refused(path, "schema version 'abc' is not an integer")


async def test_postgres_refuses_the_same_damage(postgres_server: PostgresServer) -> None:  # noqa: F811
    import psycopg

    from zorba_server.storage import PostgresStore

    conninfo = postgres_server.new_database()
    store = await PostgresStore.open(conninfo)
    alpha = await write_run(store)
    await store.close()
    alpha[1, 1] = np.inf
    damages = [
        ("UPDATE run SET alpha = %s WHERE id = 1", (np.ascontiguousarray(alpha, "<f8").tobytes(),),
         "1 NaN or infinite cells"),
        ("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'", (), "not an integer"),
        ("DROP TABLE increments", (), "increments are missing"),
    ]
    for statement, params, match in damages:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(statement, params)
        with pytest.raises(CorruptStoreError, match=match) as caught:
            await PostgresStore.open(conninfo)
        assert "\n" not in str(caught.value) and "PostgreSQL database" in str(caught.value)


async def test_the_server_refuses_a_damaged_database_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZORBA_ENROLMENT_SECRET", "s" * 16)
    path = tmp_path / "empty.sqlite3"
    path.write_bytes(b"")
    # main() runs its own event loop: run it off this test's loop.
    import asyncio

    from zorba_server.cli import main
    code = await asyncio.to_thread(main, ["--db", str(path), "--port", "0", "--log-level",
                                          "WARNING"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and str(path) in err and "empty" in err
    assert path.stat().st_size == 0


async def test_check_and_backup_tools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from zorba_server.cli import main

    path, copy = tmp_path / "run.sqlite3", tmp_path / "copy.sqlite3"
    alpha = await sqlite_run(path)
    assert main(["check", "--db", str(path)]) == 0
    assert "ok (run run, version 4, 4 rounds, 4 increments" in capsys.readouterr().out
    assert main(["backup", "--db", str(path), "--out", str(copy)]) == 0
    assert f"backed up {path} to {copy}" in capsys.readouterr().out
    store = await SqliteStore.open(copy)
    snap = await store.load(10)
    await store.close()
    assert snap.alpha is not None
    np.testing.assert_array_equal(snap.alpha, alpha)
    assert main(["backup", "--db", str(path), "--out", str(copy)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    assert main(["backup", "--db", "postgresql://u@h/runs", "--out", str(tmp_path / "x")]) == 2
    assert "pg_dump" in capsys.readouterr().err
    damage(path, ["UPDATE meta SET value = 'abc' WHERE key = 'schema_version'"])
    before = digest(path)
    assert main(["check", "--db", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an integer" in err and "\n" not in err and digest(path) == before


async def test_secret_prints_a_fresh_long_random_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from zorba_server.cli import main

    assert main(["secret"]) == 0 and main(["secret"]) == 0
    first, second = capsys.readouterr().out.split()
    assert first != second and len(first) >= 32
