"""SIGKILL between a report's commit and its acknowledgement (issue 13, item 7).

A real `zorba-server` process and no hook in it: the database and signals are enough. The
client sends its report over a raw socket and reads nothing. The test runs the server in
short slices (SIGCONT, then SIGSTOP at once) and, while it is stopped, looks for the report's
idempotency key in the database's write-ahead log; the first time it is there, the server is
killed with SIGKILL. The row must then be readable (the transaction had committed: a killed
process loses nothing the kernel already holds). Whether the answer had also left the
server is seen on the client's socket: a loaded machine can delay a SIGSTOP past it, so
three clients each try once and at least one kill must have beaten the answer. In every
case the client got no ack; after a restart on the same database its retry with the same
key gets the original ack (the commit's `received_at`), twice, and once the round closes
each report is stored once and applied once.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from server_fakes import FakeClient, make_report, profile
from test_server_durability import ServerProcess, recompute_alpha

from zorba_common.codec import CONTENT_TYPE, encode
from zorba_common.messages import Report, ReportAck

pytestmark = pytest.mark.asyncio
SLICE_S = 0.0002
"""How long the server runs between two looks at the database."""


def send_unread(port: int, path: str, token: str, body: bytes) -> socket.socket:
    """POST `body` and return the socket without reading anything (the client's view: no ack)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def stored_at(db: Path, key: str) -> float | None:
    """received_at of the committed report with `key`, or None (never waits on a lock)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0)
    try:
        row = conn.execute("SELECT received_at FROM reports WHERE idempotency_key = ?",
                           (key,)).fetchone()
        return None if row is None else float(row[0])
    except sqlite3.OperationalError:  # locked or mid-checkpoint: look again after a slice
        return None
    finally:
        conn.close()


def in_wal(db: Path, key: str) -> bool:
    wal = db.with_name(db.name + "-wal")
    return wal.exists() and key.encode() in wal.read_bytes()


def stop(pid: int) -> None:
    """SIGSTOP and wait until every thread of the process is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(_state(pid, tid) in ("T", "t") for tid in os.listdir(f"/proc/{pid}/task")):
            return
        time.sleep(0.0001)
    raise AssertionError(f"server {pid} did not stop")


def _state(pid: int, tid: str) -> str:
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except FileNotFoundError:  # a thread that ended meanwhile
        return "T"
    return stat.rsplit(")", 1)[1].split()[0]


def kill_once_committed(srv: ServerProcess, key: str, limit_s: float = 30.0) -> float:
    """Run the (stopped) server in slices until `key`'s row is committed, then SIGKILL it."""
    assert srv.proc is not None
    pid = srv.proc.pid
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGCONT)
        if SLICE_S:
            time.sleep(SLICE_S)
        stop(pid)
        if in_wal(srv.db, key):
            srv.kill()
            at = stored_at(srv.db, key)
            assert at is not None
            return at
    os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"the report {key} was not committed within {limit_s} s")


def answer_bytes(sock: socket.socket) -> bytes:
    """What reached the client's socket before the server died."""
    sock.settimeout(5)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


ATTEMPTS = 3
"""Clients that each try the kill once: at least one kill must land before the answer left."""


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerProcess]:
    """A round that waits for every client (ATTEMPTS + 1) and stays open across the kills."""
    n = ATTEMPTS + 1
    process = ServerProcess(tmp_path, min_clients=n, min_reports=n, round_duration_s=120.0,
                            lr_scaling="none")
    yield process
    if process.proc is not None and process.proc.poll() is None:
        os.kill(process.proc.pid, signal.SIGCONT)  # a failure may leave it stopped
    process.stop()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
async def test_a_retry_after_a_sigkill_between_commit_and_ack_gets_the_original_ack(
        srv: ServerProcess) -> None:
    n = ATTEMPTS + 1
    srv.start()
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        clients = [FakeClient(http) for _ in range(n)]
        for i, c in enumerate(clients):
            assert (await c.register(profile(100 * (i + 1)))).status == 201
        assignments = [(await c.poll()).assignment for c in clients]
        assert {x.round for x in assignments} == {1}
    reports = [make_report(x, [0.5 - 0.25 * i] * len(x.pool_indices))
               for i, x in enumerate(assignments)]

    leaked = []
    for i in range(ATTEMPTS):
        assert srv.proc is not None
        stop(srv.proc.pid)
        sock = send_unread(srv.port, "/v1/rounds/1/reports", clients[i].token, encode(reports[i]))
        committed_at = kill_once_committed(srv, reports[i].idempotency_key)
        # The client reads nothing: whatever the server managed to send, it got no ack.
        leaked.append(answer_bytes(sock) != b"")
        srv.start()
        async with aiohttp.ClientSession(base_url=srv.url) as http:
            status = await (await http.get("/v1/status")).json()
            assert status["version"] == 0 and status["current_round"]["round"] == 1
            assert status["current_round"]["reported"] == i + 1  # the committed reports, resumed
            clients[i].http = http
            original = ReportAck(1, reports[i].idempotency_key, committed_at)
            for _ in range(2):  # the retry, and a retry of the retry
                retry = await clients[i].report(1, reports[i])
                assert retry.status == 200, retry.body
                assert retry.body == original
    # SIGSTOP lands a fraction of a millisecond after the commit, but a loaded machine can
    # delay it past the answer: at least one kill must have beaten the answer.
    assert not all(leaked), "every answer had left the server before its kill: rerun on a quieter machine"

    async with aiohttp.ClientSession(base_url=srv.url) as http:
        for c in clients:
            c.http = http
        last = await clients[-1].report(1, reports[-1])
        assert last.status == 200, last.body
        await clients[0].poll()
        state = await clients[0].state()
    srv.kill()

    assert state.version == 1
    conn = sqlite3.connect(str(srv.db))
    try:
        keys = [k for (k,) in conn.execute("SELECT idempotency_key FROM reports")]
    finally:
        conn.close()
    assert sorted(keys) == sorted(r.idempotency_key for r in reports)  # each stored once
    expected, applied = recompute_alpha(srv.db)
    assert applied == 1
    np.testing.assert_array_equal(state.matrix(), expected)
    np.testing.assert_array_equal(clients[0].alpha, expected)
    # Applied once: alpha is lr x the sample-weighted mean of the reports' scalars on every
    # pair all clients hold (a second application of a retried report would show here).
    shared = set.intersection(*(set(x.blocks) for x in assignments))
    k = assignments[0].pool_indices[0]
    weights = [100 * (i + 1) for i in range(n)]
    mean = sum(w * _scalar_sum(r, k) for w, r in zip(weights, reports, strict=True)) / sum(weights)
    for b in shared:
        assert expected[k, b] == pytest.approx(0.01 * mean)


def _scalar_sum(report: Report, k: int) -> float:
    return sum(g for kk, g in report.steps if kk == k)
