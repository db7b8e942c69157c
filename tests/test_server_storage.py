"""The SQLite implementation's own parts, below the `Store` protocol (test_server_store.py
proves the protocol on both stores): its statements in one transaction with failures isolated,
and the group committer."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from server_fakes import FOOTPRINT, profile

from zorba_common.messages import AlphaDelta, HyperParams, Report
from zorba_server.rounds import ClientPlan, ReceivedReport, RoundPlan
from zorba_server.storage import sql
from zorba_server.storage.committer import Committer
from zorba_server.storage.sqlite import connect

PLAN = RoundPlan(1, 0, 0.0, 5.0, HyperParams(0.1, 1e-3, 8, 64), (3, 4),
                 {"c-1": ClientPlan((0,), 2)})


def fresh(tmp_path: Path) -> sqlite3.Connection:
    conn = connect(tmp_path / "db.sqlite3")
    sql.run_batch(conn, [
        lambda c: sql.create_run(c, "run", 1, 8, 0.0),
        lambda c: sql.pin_model(c, "fp", FOOTPRINT, np.zeros((8, 4))),
        lambda c: sql.insert_client(c, "c-1", b"hash", profile(), 0.0),
        lambda c: sql.insert_round(c, PLAN),
    ])
    return conn


def received(key: str = "k") -> ReceivedReport:
    return ReceivedReport("c-1", Report(key, 0, ((3, 0.5),), 8, 1.0, 1.0, 0, 0.1), b"h", 2.0)


def test_a_failing_write_is_rolled_back_alone_within_its_batch(tmp_path: Path) -> None:
    conn = fresh(tmp_path)
    results = sql.run_batch(conn, [
        lambda c: sql.insert_report(c, 1, received("a")),
        lambda c: sql.insert_report(c, 1, received("b")),  # second report of c-1: PK clash
        lambda c: sql.find_report(c, "c-1", "a"),
    ])
    assert results[0] is None and isinstance(results[1], sqlite3.IntegrityError)
    assert results[2] == (1, b"h", 2.0)
    assert conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 1


def test_a_round_closes_once_and_alpha_moves_with_its_increment(tmp_path: Path) -> None:
    conn = fresh(tmp_path)
    alpha = np.zeros((8, 4))
    alpha[3, 0] = 0.25
    delta = AlphaDelta.from_matrix(1, 1, (3,), (0,), np.array([[0.25]]))
    close = [lambda c: sql.close_round(c, 1, "applied", 3.0, 1, 1.0, "ok", delta=delta,
                                           alpha=alpha, calibrations={"c-1": 1.5})]
    assert sql.run_batch(conn, close) == [None]
    assert isinstance(sql.run_batch(conn, close)[0], RuntimeError)  # closed already
    late = sql.run_batch(conn, [lambda c: sql.insert_report(c, 1, received())])
    assert isinstance(late[0], RuntimeError)
    snap = sql.load(conn, recent_deltas=4)
    assert snap.version == 1 and snap.alpha[3, 0] == 0.25 and snap.deltas == [delta]
    assert snap.clients[0].calibration == 1.5 and snap.rounds[0].status == "applied"


def test_a_database_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    conn = fresh(tmp_path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(RuntimeError, match="schema 99"):
        connect(tmp_path / "db.sqlite3")


@pytest.mark.asyncio
async def test_concurrent_writes_share_transactions_and_each_gets_its_own_result(
        tmp_path: Path) -> None:
    conn = connect(tmp_path / "db.sqlite3")
    conn.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    committer = Committer(conn)
    committer.start()

    def insert(x: int) -> int:
        def op(c: sqlite3.Connection) -> int:
            c.execute("INSERT INTO t VALUES (?)", (x,))
            return x
        return op

    results = await asyncio.gather(*(committer.submit(insert(x % 150)) for x in range(200)),
                                   return_exceptions=True)
    await committer.stop()
    assert [r for r in results if isinstance(r, int)] == list(range(150))
    assert sum(isinstance(r, sqlite3.IntegrityError) for r in results) == 50
    assert committer.batches < 20  # grouped, not one fsync per write
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 150
