"""A real `zorba-server` process, killed with SIGKILL and restarted: nothing acked is lost,
nothing is applied twice, and alpha equals an uninterrupted run over the same reports."""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from server_fakes import SECRET, FakeClient, make_report, profile

from zorba_common.codec import decode
from zorba_common.messages import Report
from zorba_server.aggregation import Contribution, aggregate, apply_delta
from zorba_server.config import AggregationConfig
from zorba_server.rounds import RoundPlan

pytestmark = pytest.mark.asyncio
LR = 0.01


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m zorba_server` on a fixed port, so clients survive its restarts."""

    def __init__(self, tmp: Path, **run: Any) -> None:
        self.port = free_port()
        self.db = tmp / "run.sqlite3"
        self.log = tmp / "server.log"
        settings = {"pool_size": 64, "max_steps": 8, "lr": LR, "poll_timeout_s": 2.0} | run
        lines = [f'enrolment_secret = "{SECRET}"', "[storage]", f'path = "{self.db}"', "[run]"]
        lines += [f"{k} = {v!r}" for k, v in settings.items()]
        self.config = tmp / "server.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ZORBA_ENROLMENT_SECRET"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zorba_server", "--config", str(self.config), "--host",
             "127.0.0.1", "--port", str(self.port), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=self.log.open("ab"), env=env)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().decode()
                if "listening on" in line:
                    return
                if not line:
                    break
        raise AssertionError(f"server did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server(tmp_path: Path) -> Any:
    procs: list[ServerProcess] = []

    def make(**run: Any) -> ServerProcess:
        procs.append(ServerProcess(tmp_path, **run))
        return procs[-1]

    yield make
    for p in procs:
        p.stop()


def recompute_alpha(db: Path, max_applied: int | None = None) -> tuple[np.ndarray, int]:
    """Alpha an uninterrupted server computes from the stored plans and reports, in round order
    (only the first `max_applied` applied rounds, when given)."""
    conn = sqlite3.connect(str(db))
    try:
        pool_size, weights = conn.execute("SELECT pool_size FROM run").fetchone()[0], {}
        for cid, prof in conn.execute("SELECT client_id, profile FROM clients"):
            weights[cid] = float(msgpack.unpackb(prof)["num_samples"])
        alpha = None
        applied = 0
        for round_, plan_blob, status in conn.execute(
                "SELECT round, plan, status FROM rounds ORDER BY round").fetchall():
            plan = RoundPlan.from_record(msgpack.unpackb(plan_blob, strict_map_key=False))
            if alpha is None:
                num_blocks = max(b for p in plan.clients.values() for b in p.blocks) + 1
                alpha = np.zeros((pool_size, max(num_blocks, 4)))
            if status != "applied" or applied == max_applied:
                continue
            contributions = [
                Contribution(cid, plan.clients[cid].blocks, weights[cid],
                             decode(Report, body, max_bytes=1 << 30).steps,
                             plan.clients[cid].lr_scale)
                for cid, body in conn.execute(
                    "SELECT client_id, body FROM reports WHERE round = ?", (round_,))
            ]
            alpha = apply_delta(alpha, aggregate(contributions, plan.hyper.lr, AggregationConfig()))
            applied += 1
        return alpha, applied
    finally:
        conn.close()


async def test_sigkill_mid_round_keeps_every_acked_report_and_resumes_the_round(
        server: Any) -> None:
    srv = server(min_clients=6, min_reports=6, round_duration_s=120.0)
    srv.start()
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        clients = [FakeClient(http) for _ in range(6)]
        for i, c in enumerate(clients):
            assert (await c.register(profile(100 * (i + 1)))).status == 201
        for c in clients:  # round 1, uninterrupted
            a = (await c.poll()).assignment
            assert (await c.report(a.round, make_report(a))).status == 200
        assignments = [(await c.poll()).assignment for c in clients]
        assert {a.round for a in assignments} == {2}
        reports = [make_report(a, [0.3 * i - 0.5] * len(a.pool_indices))
                   for i, a in enumerate(assignments)]
        acked: dict[int, Any] = {}
        for i in range(3):
            answer = await clients[i].report(2, reports[i])
            assert answer.status == 200
            acked[i] = answer.body
        # Two more in flight when the process dies (committed or not: both are legal), the
        # sixth never sent, so round 2 cannot have closed.
        in_flight = {asyncio.ensure_future(clients[i].report(2, reports[i])): i for i in (3, 4)}
        await asyncio.sleep(0.005)
        srv.kill()
        for t, i in in_flight.items():
            try:
                answer = await t
                if answer.status == 200:
                    acked[i] = answer.body
            except aiohttp.ClientError:
                pass

    srv.start()
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        status = await (await http.get("/v1/status")).json()
        assert status["version"] == 1
        assert status["current_round"]["round"] == 2
        assert status["current_round"]["reported"] >= len(acked) >= 3
        for i, c in enumerate(clients):
            c.http = http
            answer = await c.report(2, reports[i])
            assert answer.status == 200, answer.body
            if i in acked:
                assert answer.body == acked[i]  # the original ack: stored before it was sent
        await clients[0].poll()
        state = await clients[0].state()
    assert state.version == 2
    expected, applied = recompute_alpha(srv.db)
    assert applied == 2
    np.testing.assert_array_equal(state.matrix(), expected)
    np.testing.assert_array_equal(clients[0].alpha, expected)


async def client_loop(c: FakeClient, stop: asyncio.Event, acked: dict[str, float],
                      rng: random.Random) -> None:
    """Poll, report, retry through outages with the same key; record every ack."""
    while not stop.is_set():
        try:
            answer = await c.poll(wait=1.0)
            if answer.status != "train":
                continue
            a = answer.assignment
            report = make_report(a, [rng.uniform(-1, 1) for _ in a.pool_indices])
            while not stop.is_set():
                try:
                    result = await c.report(a.round, report)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    await asyncio.sleep(0.05)
                    continue
                if result.status == 200:
                    acked[report.idempotency_key] = result.body.received_at
                break
        except (aiohttp.ClientError, asyncio.TimeoutError, AssertionError):
            await asyncio.sleep(0.05)


async def test_repeated_sigkills_never_lose_an_ack_or_apply_a_report_twice(server: Any) -> None:
    srv = server(min_clients=8, min_reports=1, round_duration_s=1.0)
    srv.start()
    rng = random.Random(7)
    acked: dict[str, float] = {}
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(base_url=srv.url, timeout=timeout) as http:
        clients = [FakeClient(http) for _ in range(8)]
        for i, c in enumerate(clients):
            assert (await c.register(profile(50 + 10 * i))).status == 201
        loops = [asyncio.ensure_future(client_loop(c, stop, acked, rng)) for c in clients]
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            srv.kill()
            srv.start()
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*loops)
        await clients[0].poll(wait=0)
        state = await clients[0].state()
    # Rounds keep closing at their 1 s deadlines after the state was served, so the served
    # state is checked against the rounds it had applied, and the durable alpha (read once
    # the server is dead) against all of them.
    srv.kill()
    assert len(acked) >= 8
    conn = sqlite3.connect(str(srv.db))
    stored = dict(conn.execute("SELECT idempotency_key, received_at FROM reports").fetchall())
    conn.close()
    missing = [k for k in acked if k not in stored]
    assert not missing, f"acked reports lost: {missing}"
    assert all(stored[k] == at for k, at in acked.items())
    served, served_rounds = recompute_alpha(srv.db, max_applied=state.version)
    assert served_rounds == state.version >= 1
    np.testing.assert_array_equal(state.matrix(), served)
    expected, applied = recompute_alpha(srv.db)
    conn = sqlite3.connect(str(srv.db))
    version, alpha_blob = conn.execute("SELECT version, alpha FROM run WHERE id = 1").fetchone()
    conn.close()
    assert applied == version >= state.version
    np.testing.assert_array_equal(np.frombuffer(alpha_blob, dtype="<f8").reshape(expected.shape), expected)
