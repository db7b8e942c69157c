"""The client's HTTP side: retries while the server is away, identical resends, refusals, TLS."""

from __future__ import annotations

import asyncio
import random
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from client_support import free_port

from zorba_common.codec import CONTENT_TYPE, decode, encode
from zorba_common.messages import ErrorBody, Report, ReportAck
from zorba_edge.client.backoff import Backoff
from zorba_edge.client.errors import ServerRefusedError, ServerUnavailableError, UsageError
from zorba_edge.client.transport import RetryNotice, ServerClient, normalize_url

FAST = Backoff(initial_s=0.01, max_s=0.05)
REPORT = Report("key-1", 3, ((5, 0.25), (9, -1.5)), 16, 0.7, 0.6, 1000, 0.1)


def msgpack_response(message: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(message), status=status, content_type=CONTENT_TYPE)


class Recorder:
    """An app whose report handler answers from a script and keeps every body it got."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.bodies: list[bytes] = []
        self.auth: list[str | None] = []

    async def report(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        self.auth.append(request.headers.get("Authorization"))
        step = self.script.pop(0) if self.script else "ok"
        if step == "drop":
            assert request.transport is not None
            request.transport.close()  # the answer is lost on the way back
            return web.Response()
        if step == "503":
            return msgpack_response(ErrorBody("starting", "retry in a moment"), 503)
        if step == "409":
            return msgpack_response(ErrorBody("round_closed", "round 2 closed: poll"), 409)
        if step == "html404":
            return web.Response(text="<html>not here</html>", status=404, content_type="text/html")
        report = decode(Report, self.bodies[-1], max_bytes=1 << 20)
        return msgpack_response(ReportAck(int(request.match_info["round"]),
                                          report.idempotency_key, 123.0))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(r"/v1/rounds/{round:\d+}/reports", self.report)
        return app


async def serve(recorder: Recorder, port: int | None = None,
                ssl_context: ssl.SSLContext | None = None, **kwargs: Any) -> TestServer:
    server = TestServer(recorder.app(), port=port, **kwargs)
    await server.start_server(ssl=ssl_context)
    return server


@pytest.mark.asyncio
async def test_a_report_retried_after_a_lost_answer_and_a_503_is_resent_byte_for_byte() -> None:
    recorder = Recorder(["drop", "503", "ok"])
    server = await serve(recorder)
    notices: list[RetryNotice] = []
    try:
        async with ServerClient(str(server.make_url("/")), token="tok", backoff=FAST,
                                on_retry=notices.append) as client:
            ack = await client.report(2, REPORT)
    finally:
        await server.close()
    assert ack == ReportAck(2, "key-1", 123.0)
    assert len(recorder.bodies) == 3
    assert recorder.bodies[0] == recorder.bodies[1] == recorder.bodies[2] == encode(REPORT)
    assert recorder.auth == ["Bearer tok"] * 3
    assert [n.attempt for n in notices] == [0, 1]
    assert "503" in notices[1].reason


@pytest.mark.asyncio
async def test_a_refusal_is_raised_at_once_with_the_servers_code_and_advice() -> None:
    recorder = Recorder(["409"])
    server = await serve(recorder)
    try:
        async with ServerClient(str(server.make_url("/")), backoff=FAST) as client:
            with pytest.raises(ServerRefusedError) as info:
                await client.report(2, REPORT)
    finally:
        await server.close()
    assert len(recorder.bodies) == 1
    assert info.value.status == 409 and info.value.code == "round_closed"
    assert "round 2 closed: poll" in str(info.value)


@pytest.mark.asyncio
async def test_a_refusal_that_is_not_msgpack_still_says_what_came_back() -> None:
    server = await serve(Recorder(["html404"]))
    try:
        async with ServerClient(str(server.make_url("/")), backoff=FAST) as client:
            with pytest.raises(ServerRefusedError, match="not here") as info:
                await client.report(2, REPORT)
    finally:
        await server.close()
    assert info.value.code == "http_error"


@pytest.mark.asyncio
async def test_an_unreachable_server_is_given_up_on_after_the_give_up_time() -> None:
    port = free_port()
    backoff = Backoff(initial_s=0.05, max_s=0.2, give_up_after_s=0.6)
    notices: list[RetryNotice] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with ServerClient(f"http://127.0.0.1:{port}", backoff=backoff,
                            on_retry=notices.append, rng=random.Random(0)) as client:
        with pytest.raises(ServerUnavailableError, match="gave up") as info:
            await client.report(1, REPORT)
    assert 0.6 <= loop.time() - started < 5.0
    assert len(notices) >= 3 and "restart the client" in str(info.value)


@pytest.mark.asyncio
async def test_a_client_waits_for_a_server_that_comes_up_later() -> None:
    port = free_port()
    recorder = Recorder([])
    notices: list[RetryNotice] = []

    async def start_late() -> TestServer:
        while len(notices) < 3:
            await asyncio.sleep(0.01)
        return await serve(recorder, port=port)

    late = asyncio.ensure_future(start_late())
    async with ServerClient(f"http://127.0.0.1:{port}", backoff=FAST,
                            on_retry=notices.append) as client:
        ack = await client.report(4, REPORT)
    await (await late).close()
    assert ack.round == 4 and len(recorder.bodies) == 1 and len(notices) >= 3


def test_server_urls_are_checked_and_normalised() -> None:
    assert normalize_url("http://host:8470/") == "http://host:8470"
    assert normalize_url(" https://h/prefix/ ") == "https://h/prefix"
    for bad in ("host:8470", "ftp://host", "http://"):
        with pytest.raises(UsageError, match="HOST:PORT"):
            normalize_url(bad)


def _make_certificates(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl command line)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], cwd=root, check=True,  # noqa: E731
                                       capture_output=True)
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=zorba test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (root / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                  "authorityKeyIdentifier=keyid\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf")
    return root / "ca.pem", root / "server.pem", root / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.asyncio
async def test_a_server_with_its_own_ca_needs_ca_cert_and_works_with_it(tmp_path: Path) -> None:
    ca, cert, key = _make_certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    recorder = Recorder([])
    server = await serve(recorder, scheme="https", host="127.0.0.1", ssl_context=context)
    url = f"https://127.0.0.1:{server.port}"
    try:
        async with ServerClient(url, backoff=FAST) as client:
            with pytest.raises(ServerUnavailableError, match="--ca-cert"):
                await client.report(1, REPORT)
        async with ServerClient(url, backoff=FAST, ca_cert=str(ca)) as client:
            assert (await client.report(1, REPORT)).round == 1
    finally:
        await server.close()
    with pytest.raises(UsageError, match="--ca-cert"):
        ServerClient(url, ca_cert=str(tmp_path / "missing.pem"))
