"""The `Store` protocol's durability and exactly-once guarantees, proved the same way against
SQLite and against a real PostgreSQL server that the tests start (tests/postgres_server.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from postgres_server import PostgresServer, postgres_server  # noqa: F401 (fixture)
from server_fakes import FOOTPRINT, profile

from zorba_common.messages import AlphaDelta, HyperParams, Report
from zorba_server.fluency_watch import FluencyVerdict, Fluent, Reference
from zorba_server.loss_guard import Anchor, Plateau
from zorba_server.rounds import ClientPlan, ReceivedReport, RoundPlan
from zorba_server.safety_state import SafetyState
from zorba_server.storage import (
    AlreadyPinnedError,
    DuplicateError,
    RoundNotOpenError,
    SchemaMismatchError,
    SqliteStore,
    Store,
    StoredReport,
)
from zorba_server.traffic import RoundBytes

pytestmark = pytest.mark.asyncio
CLIENTS = [f"c-{i}" for i in range(8)]
PLAN = RoundPlan(1, 0, 0.0, 5.0, HyperParams(0.1, 1e-3, 8, 64), (3, 4),
                 {c: ClientPlan((0,), 2) for c in CLIENTS})
Opener = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    """(name, where): a SQLite file or a fresh PostgreSQL database, for stores opened on it."""
    if request.param == "sqlite":
        return "sqlite", tmp_path / "db.sqlite3"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return "postgres", (server, server.new_database())


@pytest_asyncio.fixture
async def open_store(backend: tuple[str, Any]) -> AsyncIterator[Opener]:
    """open_store() -> a new Store on the same database (a restart opens a second one)."""
    name, where = backend
    opened: list[Store] = []

    async def _open() -> Store:
        if name == "sqlite":
            store: Store = await SqliteStore.open(where)
        else:
            from zorba_server.storage import PostgresStore

            store = await PostgresStore.open(where[1])
        opened.append(store)
        return store

    yield _open
    for store in opened:
        try:
            await store.close()
        except Exception:
            pass  # closed already, or its server was crashed on purpose


def run_sql(backend: tuple[str, Any], sqlite: Sequence[str],
            postgres: Sequence[str] | None = None) -> None:
    """Statements straight on the database, behind the stores' back (as an older server left
    it); `postgres` defaults to the same statements."""
    name, where = backend
    if name == "sqlite":
        import sqlite3

        conn = sqlite3.connect(str(where), isolation_level=None)  # autocommit
        try:
            for statement in sqlite:
                conn.execute(statement)
        finally:
            conn.close()
    else:
        import psycopg

        with psycopg.connect(where[1], autocommit=True) as conn:
            for statement in sqlite if postgres is None else postgres:
                conn.execute(statement)


async def fresh(open_store: Opener) -> Store:
    store = await open_store()
    await store.create_run("run", 1, 8, 0.0)
    await store.pin_model("fp", FOOTPRINT, np.zeros((8, 4)))
    for i, c in enumerate(CLIENTS):
        await store.insert_client(c, f"hash-{c}".encode(), profile(), float(i))
    await store.insert_round(PLAN)
    return store


def received(client: str = "c-0", key: str = "k", at: float = 2.0) -> ReceivedReport:
    return ReceivedReport(client, Report(key, 0, ((3, 0.5),), 8, 1.0, 1.0, 0, 0.1),
                          f"h-{key}".encode(), at)


async def test_a_report_is_stored_once_and_a_retry_finds_the_original(open_store: Opener) -> None:
    store = await fresh(open_store)
    await store.insert_report(1, received("c-0", "a", at=2.0))
    with pytest.raises(DuplicateError):  # the same idempotency key again
        await store.insert_report(1, received("c-0", "a", at=3.0))
    with pytest.raises(DuplicateError):  # a second report of c-0 in round 1
        await store.insert_report(1, received("c-0", "b", at=4.0))
    assert await store.find_report("c-0", "a") == StoredReport(1, b"h-a", 2.0)
    assert await store.find_report("c-0", "b") is None
    snap = await store.load(recent_deltas=4)
    assert [(r.client_id, r.received_at) for r in snap.open_reports] == [("c-0", 2.0)]


async def test_a_failing_write_fails_alone_within_its_batch(open_store: Opener) -> None:
    store = await fresh(open_store)
    # Queued together, so they share one transaction: the duplicate must not sink the others.
    results = await asyncio.gather(
        store.insert_report(1, received("c-0", "a")),
        store.insert_report(1, received("c-0", "dup")),
        store.insert_report(1, received("c-1", "b")),
        return_exceptions=True)
    assert results[0] is None and isinstance(results[1], DuplicateError) and results[2] is None
    snap = await store.load(recent_deltas=4)
    assert sorted(r.client_id for r in snap.open_reports) == ["c-0", "c-1"]


async def test_a_round_closes_once_and_alpha_moves_with_its_increment(open_store: Opener) -> None:
    store = await fresh(open_store)
    alpha = np.zeros((8, 4))
    alpha[3, 0] = 0.25
    delta = AlphaDelta.from_matrix(1, 1, (3,), (0,), np.array([[0.25]]))
    await store.close_round(1, "applied", 3.0, 1, 1.0, "ok", delta=delta, alpha=alpha,
                            calibrations={"c-1": 1.5})
    with pytest.raises(RoundNotOpenError):
        await store.close_round(1, "applied", 3.0, 1, 1.0, "ok", delta=delta, alpha=alpha)
    with pytest.raises(RoundNotOpenError):
        await store.insert_report(1, received())
    with pytest.raises(AlreadyPinnedError):
        await store.pin_model("fp", FOOTPRINT, np.zeros((8, 4)))
    snap = await store.load(recent_deltas=4)
    assert snap.version == 1 and snap.alpha is not None and snap.alpha[3, 0] == 0.25
    assert snap.deltas == [delta] and snap.rounds[0].status == "applied"
    assert {c.client_id: c.calibration for c in snap.clients}["c-1"] == 1.5


async def test_concurrent_reports_share_transactions_and_each_gets_its_own_answer(
        open_store: Opener) -> None:
    store = await fresh(open_store)
    # 8 clients, each sending its report 3 times with the same key: 8 stored, 16 duplicates.
    batches_before = store.stats.batches
    sends = [store.insert_report(1, received(c, f"key-{c}")) for _ in range(3) for c in CLIENTS]
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert results[:8] == [None] * 8
    assert all(isinstance(r, DuplicateError) for r in results[8:])
    assert store.stats.batches - batches_before < 10  # grouped, not one commit each
    snap = await store.load(recent_deltas=4)
    assert sorted(r.client_id for r in snap.open_reports) == CLIENTS


async def test_every_acknowledged_write_survives_a_restart(open_store: Opener) -> None:
    store = await fresh(open_store)
    await asyncio.gather(*(store.insert_report(1, received(c, f"key-{c}", at=float(i)))
                           for i, c in enumerate(CLIENTS)))
    await store.close()
    again = await open_store()
    snap = await again.load(recent_deltas=4)
    assert snap.run_id == "run" and snap.footprint == FOOTPRINT and len(snap.clients) == 8
    assert [(r.client_id, r.received_at) for r in snap.open_reports] == \
        [(c, float(i)) for i, c in enumerate(CLIENTS)]
    with pytest.raises(DuplicateError):  # exactly once, across the restart too
        await again.insert_report(1, received("c-0", "key-c-0"))


async def test_a_database_of_another_schema_version_is_refused(
        open_store: Opener, backend: tuple[str, Any]) -> None:
    store = await fresh(open_store)
    await store.close()
    run_sql(backend, ["UPDATE meta SET value = '99' WHERE key = 'schema_version'"])
    with pytest.raises(SchemaMismatchError, match="schema 99"):
        await open_store()


async def test_postgres_keeps_every_acknowledged_report_through_a_server_crash(
        postgres_server: PostgresServer) -> None:  # noqa: F811
    """pg_ctl's immediate stop is a crash: no checkpoint, recovery from the WAL on restart."""
    from zorba_server.storage import PostgresStore, StoreUnavailableError

    conninfo = postgres_server.new_database()
    store = await PostgresStore.open(conninfo)
    await store.create_run("run", 1, 8, 0.0)
    for c in CLIENTS:
        await store.insert_client(c, f"hash-{c}".encode(), profile(), 0.0)
    await store.insert_round(PLAN)
    await asyncio.gather(*(store.insert_report(1, received(c, f"key-{c}")) for c in CLIENTS[:5]))
    postgres_server.stop("immediate")
    try:
        with pytest.raises(StoreUnavailableError):  # a domain error, not psycopg's
            await store.insert_report(1, received("c-5", "key-c-5"))
    finally:
        postgres_server.start()
    await store.close()
    again = await PostgresStore.open(conninfo)
    try:
        snap = await again.load(recent_deltas=4)
        assert sorted(r.client_id for r in snap.open_reports) == CLIENTS[:5]
    finally:
        await again.close()


async def test_a_database_from_before_departures_gains_the_table_and_keeps_its_run(
        open_store: Opener, backend: tuple[str, Any]) -> None:
    store = await fresh(open_store)
    await store.close()
    run_sql(backend, ["DROP TABLE departures"])  # as the version before POST /v1/leave left it
    again = await open_store()
    snap = await again.load(recent_deltas=4)
    assert len(snap.clients) == 8 and all(c.left_at is None for c in snap.clients)
    await again.set_left("c-3", 7.0)
    await again.set_left("c-4", 8.0)
    await again.set_left("c-4", None)  # it came back
    snap = await again.load(recent_deltas=4)
    assert {c.client_id: c.left_at for c in snap.clients if c.left_at is not None} == {"c-3": 7.0}


async def test_a_round_closes_as_rejected_with_or_without_the_guards_rollback(
        open_store: Opener) -> None:
    """The loss guard's outcome: schema 1 refused the status, and a real server's round driver
    then failed on every retry (a 20-minute quickstart stalled at round 22)."""
    store = await fresh(open_store)
    await store.close_round(1, "rejected", 3.0, 1, 1.0, "loss jumped: not applied")
    second = dataclasses.replace(PLAN, round=2)
    await store.insert_round(second)
    alpha = np.zeros((8, 4))
    alpha[3, 0] = -0.5
    rollback = AlphaDelta.from_matrix(1, 2, (3,), (0,), np.array([[-0.5]]))
    await store.close_round(2, "rejected", 5.0, 1, 1.0, "rolled back to version 0",
                            delta=rollback, alpha=alpha)
    snap = await store.load(recent_deltas=4)
    assert [r.status for r in snap.rounds] == ["rejected", "rejected"]
    assert snap.version == 1 and snap.deltas == [rollback] and snap.alpha[3, 0] == -0.5


async def test_a_schema_1_database_is_migrated_and_can_then_reject_a_round(
        open_store: Opener, backend: tuple[str, Any]) -> None:
    store = await fresh(open_store)
    await store.insert_report(1, received("c-0", "a"))
    await store.close()
    # the rounds table exactly as schema 1 created it
    rewind_rounds_table(backend, 1, ("open", "applied", "failed"))
    again = await open_store()
    await again.close_round(1, "rejected", 3.0, 1, 1.0, "loss jumped: not applied")
    snap = await again.load(recent_deltas=4)
    assert [r.status for r in snap.rounds] == ["rejected"]
    assert await again.find_report("c-0", "a") is not None  # the rows came through
    await again.close()
    reopened = await open_store()  # stamped 2 now: opens without migrating again
    assert [r.status for r in (await reopened.load(recent_deltas=4)).rounds] == ["rejected"]


async def test_the_bytes_of_each_clients_last_reported_round_come_back_after_a_restart(
        open_store: Opener) -> None:
    store = await fresh(open_store)
    await store.insert_report(1, received("c-0", "a"), RoundBytes(263, 536))
    await store.insert_report(1, received("c-1", "b"))  # no figure: none shown, not a zero
    await store.close_round(1, "failed", 3.0, 2, None, "too few reports")
    await store.insert_round(dataclasses.replace(PLAN, round=2))
    await store.insert_report(2, received("c-0", "c"), RoundBytes(250, 2**33))  # > 32 bits
    await store.close()
    snap = await (await open_store()).load(recent_deltas=4)
    assert {cid: (h.count, h.last_round_bytes) for cid, h in snap.client_reports.items()} == {
        "c-0": (2, RoundBytes(250, 2**33)), "c-1": (1, None)}


async def test_a_schema_2_database_gains_the_report_byte_columns_and_keeps_its_reports(
        open_store: Opener, backend: tuple[str, Any]) -> None:
    store = await fresh(open_store)
    await store.insert_report(1, received("c-0", "a"))
    await store.close()
    run_sql(backend, [  # the reports table as schema 2 created it
        "ALTER TABLE reports DROP COLUMN bytes_up",
        "ALTER TABLE reports DROP COLUMN bytes_down",
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
    ])
    again = await open_store()
    snap = await again.load(recent_deltas=4)
    assert [r.client_id for r in snap.open_reports] == ["c-0"]
    assert snap.client_reports["c-0"].last_round_bytes is None  # never counted durably
    await again.insert_report(1, received("c-1", "b"), RoundBytes(10, 20))
    await again.close()
    reopened = await open_store()  # stamped 3 now: opens without migrating again
    snap = await reopened.load(recent_deltas=4)
    assert snap.client_reports["c-1"].last_round_bytes == RoundBytes(10, 20)
    assert await reopened.find_report("c-0", "a") is not None


async def test_the_loss_guards_outlier_rounds_are_stored_with_the_close_and_come_back(
        open_store: Opener) -> None:
    store = await fresh(open_store)
    await store.close_round(1, "failed", 3.0, 0, None, "too few reports",
                            guard_outliers=("c-1", "c-2"))
    await store.insert_round(dataclasses.replace(PLAN, round=2))
    await store.close_round(2, "failed", 4.0, 0, None, "too few reports", guard_outliers=("c-1",))
    await store.close()
    snap = await (await open_store()).load(recent_deltas=4)
    assert {c.client_id: c.guard_outlier_rounds for c in snap.clients if c.guard_outlier_rounds} == {
        "c-1": 2, "c-2": 1}


async def test_a_schema_3_database_gains_the_outlier_column_at_zero(
        open_store: Opener, backend: tuple[str, Any]) -> None:
    store = await fresh(open_store)
    await store.close()
    run_sql(backend, [  # the clients table as schema 3 created it
        "ALTER TABLE clients DROP COLUMN guard_outlier_rounds",
        "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
    ])
    again = await open_store()
    assert {c.guard_outlier_rounds for c in (await again.load(recent_deltas=4)).clients} == {0}
    await again.close_round(1, "failed", 3.0, 0, None, "too few reports", guard_outliers=("c-0",))
    await again.close()
    reopened = await open_store()  # stamped 4 now: opens without migrating again
    snap = await reopened.load(recent_deltas=4)
    assert [c.guard_outlier_rounds for c in snap.clients if c.client_id == "c-0"] == [1]


async def test_the_safety_state_comes_back_with_its_tables_replayed_from_the_increments(
        open_store: Opener) -> None:
    """What the loss guard and the fluency watch remember (safety_state.py) is stored with a
    close and loaded with the tables of its versions, which are not stored themselves."""
    store = await fresh(open_store)
    first = AlphaDelta.from_matrix(1, 1, (3,), (0,), np.array([[-0.5]]))
    alpha = np.zeros((8, 4))
    alpha[3, 0] = -0.5
    at_1 = alpha.copy()
    state = SafetyState(Anchor(1, at_1, {"c-0": 0.7}), Fluent(0, np.zeros((8, 4))),
                        {"c-0": Reference(3.1, True), "c-1": Reference(3.2, False)},
                        Plateau(2, 1), {"c-0": 0.9},
                        FluencyVerdict(1, False, 3.1, 3.3, 0, 2))
    await store.close_round(1, "applied", 3.0, 1, 1.0, "ok", delta=first, alpha=alpha, safety=state)
    await store.insert_round(dataclasses.replace(PLAN, round=2, base_version=1))
    second = AlphaDelta.from_matrix(2, 2, (4,), (1,), np.array([[0.25]]))
    alpha[4, 1] = 0.25
    await store.close_round(2, "applied", 5.0, 1, 1.0, "ok", delta=second, alpha=alpha)
    await store.insert_round(dataclasses.replace(PLAN, round=3, base_version=2))
    await store.close_round(3, "checked", 7.0, 1, 1.0, "final check of version 2: sound",
                            safety=dataclasses.replace(state, plateau=Plateau(0, 1)))
    await store.close()
    snap = await (await open_store()).load(recent_deltas=1)
    assert [r.status for r in snap.rounds] == ["applied", "applied", "checked"]
    loaded = snap.safety
    assert loaded is not None and loaded.anchor is not None and loaded.fluent is not None
    assert loaded.anchor.version == 1 and np.array_equal(loaded.anchor.alpha, at_1)
    assert loaded.anchor.losses == {"c-0": 0.7}
    assert loaded.fluent.version == 0 and not loaded.fluent.alpha.any()
    assert loaded.references == state.references and loaded.plateau == Plateau(0, 1)
    assert loaded.reference_losses == {"c-0": 0.9} and loaded.last_fluency == state.last_fluency


async def test_a_schema_4_database_is_migrated_and_can_close_a_final_check(
        open_store: Opener, backend: tuple[str, Any]) -> None:
    store = await fresh(open_store)
    await store.close()
    # the rounds table as schema 4 created it, and no safety table
    rewind_rounds_table(backend, 4, ("open", "applied", "failed", "rejected"),
                        also=["DROP TABLE safety"])
    again = await open_store()
    assert (await again.load(recent_deltas=4)).safety is None
    await again.close_round(1, "checked", 3.0, 1, 1.0, "final check", safety=SafetyState())
    snap = await again.load(recent_deltas=4)
    assert [r.status for r in snap.rounds] == ["checked"] and snap.safety == SafetyState()


def rewind_rounds_table(backend: tuple[str, Any], version: int, statuses: tuple[str, ...],
                        also: Sequence[str] = ()) -> None:
    """Make a store's database look as schema `version` left it: the rounds table's status
    check allowing only `statuses`, the statements `also` run, the schema stamped `version`."""
    old_check = "CHECK (status IN (" + ", ".join(f"'{s}'" for s in statuses) + "))"
    stamp = f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'"
    run_sql(backend, [
        "PRAGMA foreign_keys=OFF", "BEGIN",
        "CREATE TABLE old_rounds AS SELECT * FROM rounds",
        "DROP TABLE rounds",
        f"CREATE TABLE rounds (round INTEGER PRIMARY KEY, status TEXT NOT NULL {old_check}, "
        "plan BLOB NOT NULL, closed_at REAL, reports INTEGER NOT NULL DEFAULT 0, loss REAL, "
        "message TEXT NOT NULL DEFAULT '')",
        "INSERT INTO rounds SELECT * FROM old_rounds",
        "DROP TABLE old_rounds", *also, stamp,
        "COMMIT",
    ], postgres=[
        "ALTER TABLE rounds DROP CONSTRAINT rounds_status_check",
        f"ALTER TABLE rounds ADD CONSTRAINT rounds_status_check {old_check}",
        *also, stamp,
    ])
