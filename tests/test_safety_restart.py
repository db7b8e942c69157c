"""A restarted server judges as an uninterrupted one would (issue 26, item 5): the loss guard's
anchor, the fluency watch's references and last fluent version, and where the final check
stands are stored with every round's close."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_fakes import FakeClient, config_dict, make_report, profile
from test_safety_server import RMS

from zorba_server.app import create_app
from zorba_server.config import config_from_dict

pytestmark = pytest.mark.asyncio
RUN = {"min_clients": 3, "min_reports": 3, "round_duration_s": 3600.0, "max_rounds": 3}
ROUNDS = (  # (check loss, generic-text loss) every client measures at the round's base
    (1.0, 3.0),  # version 0: the anchor and the watch's base
    (1.0, 3.3),  # version 1: sound, fluent
    (1.6, 3.7),  # version 2: 60% above the anchor's check loss, 23% above the base: rolled back
    (1.0, 3.1),  # version 3 (version 1's table again): sound
    (0.9, 3.0),  # version 4, after run.max_rounds applied rounds: the final check
)


async def started(db: Path, aiohttp_client: Any) -> Any:
    return await aiohttp_client(create_app(config_from_dict(config_dict(db, **RUN))))


async def one_round(clients: list[FakeClient], check: float, generic: float) -> None:
    """Every client polls for the open round and reports; it closes on the last report."""
    for client in clients:
        answer = await client.poll()
        while answer.assignment is None:
            assert answer.status != "finished"
            answer = await client.poll()
        a = answer.assignment
        report = dataclasses.replace(make_report(a, loss_generic=generic if a.measure_generic else None),
                                     loss_check=check)
        assert (await client.report(a.round, report)).status == 200


async def run(db: Path, aiohttp_client: Any, restart_before: set[int]) -> tuple[list[Any], Any, Any]:
    """The rounds of ROUNDS, the server restarted before each round in `restart_before`;
    the rounds' (status, message), the table and the status once the run finished."""
    http = await started(db, aiohttp_client)
    clients = [FakeClient(http) for _ in range(3)]
    for client in clients:
        assert (await client.register(profile(name="dev", base_rms=RMS))).status == 201
    for i, (check, generic) in enumerate(ROUNDS):
        if i in restart_before:
            await http.close()
            http = await started(db, aiohttp_client)
            for client in clients:
                client.http = http
        if i == len(ROUNDS) - 1:  # the final check is open, and the status page says so
            assert (await clients[0].poll()).assignment is not None
            current = (await (await http.get("/v1/status")).json())["current_round"]
            assert current["final_check"] and current["base_version"] == 4
            assert "the final check of version 4" in await (await http.get("/")).text()
        await one_round(clients, check, generic)
    assert (await clients[0].poll()).status == "finished"
    status = await (await http.get("/v1/status")).json()
    state = await clients[0].state()
    await http.close()
    if restart_before:  # finished, and still so after one more restart
        http = await started(db, aiohttp_client)
        assert (await (await http.get("/v1/status")).json())["finished"]
        await http.close()
    return [(r["status"], r["message"]) for r in status["rounds"]], state.matrix(), status


async def test_a_server_restarted_between_rounds_decides_as_an_uninterrupted_one(
        tmp_path: Path, aiohttp_client: Any) -> None:
    rounds, alpha, status = await run(tmp_path / "straight.sqlite3", aiohttp_client, set())
    assert [s for s, _ in rounds] == ["applied", "applied", "rejected", "applied", "checked"]
    assert "the fluency watch: generation broke" in rounds[2][1]
    assert status["finished"] and status["counters"]["rounds_checked"] == 1
    again, alpha_again, status_again = await run(tmp_path / "restarted.sqlite3", aiohttp_client,
                                                 {1, 2, 3, 4})
    assert again == rounds
    assert np.array_equal(alpha_again, alpha)
    assert status_again["fluency"] == status["fluency"]
    assert ([c["generic_reference"] for c in status_again["clients"]]
            == [c["generic_reference"] for c in status["clients"]])
    assert status_again["hyper"]["lr"] == status["hyper"]["lr"]


async def test_a_database_of_the_previous_schema_gains_the_new_status_and_the_safety_table(
        tmp_path: Path, aiohttp_client: Any) -> None:
    db = tmp_path / "old.sqlite3"
    http = await started(db, aiohttp_client)
    clients = [FakeClient(http) for _ in range(3)]
    for client in clients:
        assert (await client.register(profile(name="dev", base_rms=RMS))).status == 201
    await one_round(clients, 1.0, 3.0)
    await http.close()
    # As schema 4 left it: no `checked` status in the rounds' constraint, no safety table.
    conn = sqlite3.connect(db)
    create = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'rounds'").fetchone()[0]
    conn.executescript(f"""
        PRAGMA foreign_keys=OFF; BEGIN;
        CREATE TABLE rounds_old {create.split('rounds', 1)[1].replace(", 'checked'", "")};
        INSERT INTO rounds_old SELECT * FROM rounds; DROP TABLE rounds;
        ALTER TABLE rounds_old RENAME TO rounds; DROP TABLE safety;
        UPDATE meta SET value = '4' WHERE key = 'schema_version'; COMMIT;""")
    conn.close()
    http = await started(db, aiohttp_client)
    for client in clients:
        client.http = http
    for check, generic in ROUNDS[1:]:
        await one_round(clients, check, generic)
    assert (await clients[0].poll()).status == "finished"  # (the long poll waits for the close)
    status = await (await http.get("/v1/status")).json()
    assert status["finished"] and status["rounds"][-1]["status"] == "checked", status["rounds"]
    await http.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "5"
    assert conn.execute("SELECT COUNT(*) FROM safety").fetchone()[0] == 1
    conn.close()


async def test_a_run_restarted_with_max_rounds_reached_ends_with_a_final_check(
        tmp_path: Path, aiohttp_client: Any) -> None:
    """How an operator ends a run early on a judged version (docs/learning.md)."""
    db = tmp_path / "db.sqlite3"
    http = await aiohttp_client(create_app(config_from_dict(config_dict(db, **(RUN | {"max_rounds": 0})))))
    clients = [FakeClient(http) for _ in range(3)]
    for client in clients:
        assert (await client.register(profile(name="dev", base_rms=RMS))).status == 201
    for check, generic in ROUNDS[:2]:
        await one_round(clients, check, generic)
    await http.close()
    http = await aiohttp_client(create_app(config_from_dict(config_dict(db, **(RUN | {"max_rounds": 2})))))
    for client in clients:
        client.http = http
    # A round the first server had opened already (it planned for an open-ended run) is
    # reopened as it was and applied; the round after it checks the final version.
    for _ in range(2):
        await one_round(clients, 1.0, 3.2)
        answer = await clients[0].poll()
        if answer.status == "finished":
            break
    assert answer.status == "finished"
    status = await (await http.get("/v1/status")).json()
    statuses = [r["status"] for r in status["rounds"]]
    assert statuses in (["applied"] * 2 + ["checked"], ["applied"] * 3 + ["checked"])
    assert status["version"] == len(statuses) - 1
