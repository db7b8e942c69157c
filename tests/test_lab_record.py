"""Research readers go through the server's `Store`: the same record reads back from SQLite
and from PostgreSQL, and a missing database is named rather than created."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from postgres_server import PostgresServer, postgres_server  # noqa: F401 (fixture)
from server_fakes import FOOTPRINT, profile

from zorba_common.messages import AlphaDelta, HyperParams, Report
from zorba_lab.record import RecordError, read_record
from zorba_lab.results import read_clients, read_reports, read_rounds
from zorba_server.rounds import ClientPlan, ReceivedReport, RoundPlan
from zorba_server.storage import ModelPin, open_store

HYPER = HyperParams(0.1, 1e-3, 8, 64)


def plan(round_: int, base: int) -> RoundPlan:
    return RoundPlan(round_, base, 10.0 * round_, 10.0 * round_ + 5, HYPER, (3, 4),
                     {"c-a": ClientPlan((0, 1), 2), "c-b": ClientPlan((2,), 2)},
                     excluded={"c-c": "over budget"})


def report(key: str, loss: float) -> Report:
    return Report(key, 0, ((3, 0.5), (4, -0.5)), 8, loss, loss, 1 << 20, 0.1)


async def write(location: str) -> None:
    store = await open_store(location)
    await store.create_run("run-x", 3, 8, 1.0)
    for i, cid in enumerate(("c-a", "c-b", "c-c")):
        pin = ModelPin("fp", FOOTPRINT, np.zeros((8, 4))) if i == 0 else None
        await store.insert_client(cid, cid.encode(), profile(name=cid), float(i), pin)
    alpha = np.zeros((8, 4))  # the sum of the increments, as a server keeps it
    for round_, version in ((1, 1), (2, 2)):
        await store.insert_round(plan(round_, version - 1))
        for cid, loss in (("c-b", 2.0 / round_), ("c-a", 1.0 / round_)):
            await store.insert_report(round_, ReceivedReport(
                cid, report(f"{cid}-{round_}", loss), b"h", 10.0 * round_ + 1))
        delta = AlphaDelta.from_matrix(version, round_, (3,), (0,), np.array([[0.1 * round_]]))
        alpha = alpha.copy()
        alpha[3, 0] += float(delta.matrix()[0, 0])
        await store.close_round(round_, "applied", 10.0 * round_ + 4, 2, 1.0, "ok", delta=delta,
                                alpha=alpha)
    await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_run_record_reads_back_the_same_from_either_store(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        location = server.new_database_url()
    else:
        location = str(tmp_path / "run.sqlite3")
    asyncio.run(write(location))
    record = read_record(location)
    assert record.snapshot.run_id == "run-x" and record.snapshot.seed == 3
    assert [(d.version, d.round) for d in record.snapshot.deltas] == [(1, 1), (2, 2)]
    assert [(r, cid, rep.loss_mean) for r, cid, rep in read_reports(location)] == \
        [(1, "c-a", 1.0), (1, "c-b", 2.0), (2, "c-a", 0.5), (2, "c-b", 1.0)]
    rounds = read_rounds(location)
    assert [(r.round, r.status) for r in rounds] == [(1, "applied"), (2, "applied")]
    assert rounds[0].blocks == {"c-a": (0, 1), "c-b": (2,)}
    assert rounds[0].excluded == {"c-c": "over budget"}
    assert {cid: p.name for cid, p in read_clients(location).items()} == \
        {"c-a": "c-a", "c-b": "c-b", "c-c": "c-c"}


def test_a_missing_database_is_named_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sqlite3"
    with pytest.raises(RecordError, match="no server database at"):
        read_record(missing)
    assert not missing.exists()
