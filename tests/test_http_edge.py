"""The HTTP edge and the operator's view (issue 27): duplicate Authorization headers, a body on
leave and non-ASCII digits in `wait` are refused; /healthz; a round whose missing clients all
left closes at once; counters survive a restart; each round's outcome is one INFO line."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from server_fakes import FakeClient, config_dict, make_report

from zorba_server.app import create_app
from zorba_server.config import config_from_dict

pytestmark = pytest.mark.asyncio


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def started(tmp_path: Path, aiohttp_client: Any, clock: Any = time.time,
                  **run: Any) -> Any:
    app = create_app(config_from_dict(config_dict(tmp_path / "db.sqlite3", **run)), clock=clock)
    return await aiohttp_client(app)


async def test_duplicate_authorization_a_body_on_leave_and_unicode_digits_are_refused(
        tmp_path: Path, aiohttp_client: Any) -> None:
    http = await started(tmp_path, aiohttp_client)
    c = FakeClient(http)
    assert (await c.register()).status == 201
    auth = f"Bearer {c.token}"
    twice = await http.get("/v1/rounds/next?version=0&wait=0",
                           headers=[("Authorization", auth), ("Authorization", "Bearer other")])
    assert twice.status == 400
    assert msgpack.unpackb(await twice.read())["error"] == "duplicate_authorization"
    arabic = await http.get("/v1/rounds/next?version=0&wait=\u0663", headers={"Authorization": auth})
    assert arabic.status == 400 and msgpack.unpackb(await arabic.read())["error"] == "bad_query"
    body = await http.post("/v1/leave", data=b"x" * 1024, headers={"Authorization": auth})
    assert body.status == 413 and msgpack.unpackb(await body.read())["error"] == "too_large"
    assert (await http.post("/v1/leave", headers={"Authorization": auth})).status == 204


async def test_healthz_answers_ok_once_the_run_is_loaded(tmp_path: Path, aiohttp_client: Any) -> None:
    http = await started(tmp_path, aiohttp_client)
    answer = await http.get("/healthz")
    assert answer.status == 200 and await answer.text() == "ok\n"


async def test_a_round_closes_as_soon_as_its_missing_clients_have_left(
        tmp_path: Path, aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()  # the deadline never passes: only the leave can close the round
    http = await started(tmp_path, aiohttp_client, clock, min_clients=2, min_reports=1,
                         round_duration_s=3600.0)
    a, b = FakeClient(http), FakeClient(http)
    assert (await a.register()).status == 201 and (await b.register()).status == 201
    assignment = (await a.poll()).assignment
    assert assignment is not None
    with caplog.at_level(logging.INFO, logger="zorba_server"):
        assert (await a.report(assignment.round, make_report(assignment, loss=0.75))).status == 200
        left = await http.post("/v1/leave", headers={"Authorization": f"Bearer {b.token}"})
        assert left.status == 204
        while (await a.poll(wait=5)).version < 1:  # woken by the close, long before 3600 s
            pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1 applied")]
    assert len(lines) == 1 and "1 of 2 reports, loss 0.75, version 1, next step 0.01" in lines[0]


async def test_registrations_and_rejections_are_counted_across_a_restart(
        tmp_path: Path, aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="zorba_server"):
        first = await started(tmp_path, aiohttp_client)
        for _ in range(2):
            assert (await FakeClient(first).register()).status == 201
        await first.close()
    assert sum(r.getMessage().startswith("registered c-") for r in caplog.records) == 2
    again = await started(tmp_path, aiohttp_client)
    metrics = await (await again.get("/metrics")).text()
    assert "zorba_registrations_total 2.0" in metrics
    assert 'zorba_rounds_total{status="rejected"} 0.0' in metrics
    status = await (await again.get("/v1/status")).json()
    assert status["counters"]["registrations"] == 2 and status["counters"]["rounds_rejected"] == 0


async def test_malformed_http_is_one_warning_line_not_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from aiohttp import web

    from zorba_server.http_log import http_logger

    app = create_app(config_from_dict(config_dict(tmp_path / "db.sqlite3")))
    runner = web.AppRunner(app, access_log=None, logger=http_logger())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
            await writer.drain()
            answer = await reader.read()  # aiohttp answers 400 and closes the connection
            writer.close()
    finally:
        await runner.cleanup()
    assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    records = [r for r in caplog.records if r.name == "zorba_server.http"]
    assert len(records) == 1 and records[0].levelname == "WARNING"
    assert records[0].getMessage().startswith("malformed HTTP from 127.0.0.1: ")
    assert records[0].exc_info is None and "\n" not in records[0].getMessage()


async def test_bytes_up_count_a_chunked_body_as_read(tmp_path: Path, aiohttp_client: Any) -> None:
    """A proxy or client that streams its body sends no Content-Length: it counted 0 bytes."""
    from zorba_common.codec import CONTENT_TYPE, encode

    http = await started(tmp_path, aiohttp_client)
    c = FakeClient(http)
    assert (await c.register()).status == 201
    assignment = (await c.poll()).assignment
    body = encode(make_report(assignment))

    async def chunks() -> Any:
        yield body[:10]
        yield body[10:]

    answer = await http.post(f"/v1/rounds/{assignment.round}/reports", data=chunks(),
                             headers={"Authorization": f"Bearer {c.token}",
                                      "Content-Type": CONTENT_TYPE})
    assert answer.status == 200 and answer.request_info.headers.get("Transfer-Encoding") == "chunked"
    status = await (await http.get("/v1/status")).json()
    assert status["clients"][0]["last_round_bytes_up"] == len(body)


async def guarded(tmp_path: Path, limits: Any) -> tuple[Any, Any, int]:
    import socket

    from zorba_server.http_edge import app_runner, listen

    runner = app_runner(create_app(config_from_dict(config_dict(tmp_path / "db.sqlite3"))))
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    listening = await listen(runner, sock, None, limits)
    return runner, listening, sock.getsockname()[1]


async def test_a_connection_that_never_finishes_its_request_head_is_closed(tmp_path: Path) -> None:
    import asyncio

    import aiohttp

    from zorba_server.http_edge import HeadLimits

    runner, listening, port = await guarded(tmp_path, HeadLimits(timeout_s=0.2, max_pending=16))
    try:
        async with aiohttp.ClientSession() as http:  # a whole request is served as before
            answer = await http.get(f"http://127.0.0.1:{port}/healthz")
            assert answer.status == 200
        for sent in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):  # nothing; half a head
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(sent)
            await writer.drain()
            assert await reader.read() == b""  # the server closed it (the event awaited)
            writer.close()
    finally:
        listening.close()
        await runner.cleanup()


async def test_connections_past_the_cap_of_pending_heads_are_refused(tmp_path: Path) -> None:
    import asyncio

    from zorba_server.http_edge import HeadLimits

    runner, listening, port = await guarded(tmp_path, HeadLimits(timeout_s=300, max_pending=2))
    held = []
    try:
        for _ in range(2):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        while len(listening.pending) < 2:  # the server has taken both (an event, polled)
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await reader.read() == b""
        except ConnectionResetError:
            pass  # aborted: as refused as a clean close
        writer.close()
        # A held connection that completes its head is served: the cap was on heads, not work.
        reader, writer = held[0]
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).split(b"\r\n")[0].endswith(b"200 OK")
    finally:
        for _, writer in held:
            writer.close()
        listening.close()
        await runner.cleanup()


async def test_malformed_http_is_answered_with_the_error_body_and_logged_in_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from zorba_server.http_edge import HeadLimits

    runner, listening, port = await guarded(tmp_path, HeadLimits())
    try:
        with caplog.at_level(logging.INFO):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
            await writer.drain()
            answer = await reader.read()  # the server closes the connection after answering
            writer.close()
    finally:
        listening.close()
        await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split()[1] == "400"  # (HTTP/1.0: the request line was not read)
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    assert headers["content-type"] == "application/msgpack"
    error = msgpack.unpackb(body)
    assert error["error"] == "malformed_http" and "could not be parsed" in error["message"]
    malformed = [r for r in caplog.records if "malformed HTTP" in r.getMessage()]
    assert len(malformed) == 1 and malformed[0].levelno == logging.WARNING
    assert malformed[0].exc_info is None and "\n" not in malformed[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
