"""The loss guard's outlier counts, and so its quarantine, survive a server restart (issue 27):
they are stored with each round's close, and a restarted server keeps ignoring the client."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from server_fakes import FakeClient, config_dict, make_report

from zorba_server.app import create_app
from zorba_server.config import config_from_dict

pytestmark = pytest.mark.asyncio
RUN = {"min_clients": 4, "min_reports": 4, "loss_jump_tolerance": 0.5, "round_duration_s": 3600.0}


async def started(tmp_path: Path, aiohttp_client: Any) -> Any:
    return await aiohttp_client(create_app(config_from_dict(config_dict(tmp_path / "db.sqlite3", **RUN))))


async def one_round(clients: list[FakeClient], checks: list[float]) -> None:
    """Every client polls for the open round's assignment and reports its check loss; the
    round closes on the last report (no deadline passes: it is an hour)."""
    for client, check in zip(clients, checks, strict=True):
        answer = await client.poll()
        while answer.assignment is None:  # the round opens once all are registered
            assert answer.status != "finished"
            answer = await client.poll()
        report = dataclasses.replace(make_report(answer.assignment), loss_check=check)
        assert (await client.report(answer.assignment.round, report)).status == 200


async def guard_view(http: Any) -> dict[str, tuple[int, bool]]:
    status = await (await http.get("/v1/status")).json()
    return {c["client_id"]: (c["guard_outlier_rounds"], c["guard_quarantined"])
            for c in status["clients"]}


async def test_a_quarantined_client_stays_quarantined_after_a_restart(
        tmp_path: Path, aiohttp_client: Any) -> None:
    first = await started(tmp_path, aiohttp_client)
    attacker, *honest = clients = [FakeClient(first) for _ in range(4)]
    for client in clients:
        assert (await client.register()).status == 201
    # The attack of the issue: 0.0 once, then 1e6, while the others' check losses fall.
    for r in range(6):
        await one_round(clients, [0.0 if r == 0 else 1e6] + [0.70 - 0.01 * r] * 3)
        if (await guard_view(first))[attacker.client_id][1]:
            break
    before = await guard_view(first)
    assert before[attacker.client_id][1], before  # quarantined
    assert all(before[c.client_id] == (0, False) for c in honest)
    await first.close()

    again = await started(tmp_path, aiohttp_client)
    assert await guard_view(again) == before
