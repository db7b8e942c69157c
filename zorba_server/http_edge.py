"""A listening socket that does not let slow connections pile up (issue 27).

aiohttp holds a new connection for as long as its first request's head takes to arrive, and
has no limit of its own on how many do so at once: a few thousand connections that send
their headers a byte at a time (or nothing) hold the server's sockets and memory. Each
connection here passes through `HeadGuard`, which closes it when its first request's head
(everything up to the blank line) has not arrived within `timeout_s`, and refuses a new
connection while `max_pending` others are still sending theirs. Once a head is in, the
connection is aiohttp's alone (an idle keep-alive one is closed by aiohttp's own
`keepalive_timeout`).

A request aiohttp cannot parse (a bad request line or header) is answered as every other
refusal, with the msgpack error body of docs/protocol.md (`malformed_http`), not aiohttp's
own text/plain page (`MsgpackErrors`); http_log.py logs it as one WARNING line.

    listening = await listen(runner, sock, ssl_context, HeadLimits())
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from zorba_server.app import error_response
from zorba_server.http_log import http_logger

log = logging.getLogger("zorba_server")

HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class HeadLimits:
    timeout_s: float = 30.0
    """Longest a new connection may take to send its first request's head."""
    max_pending: int = 1024
    """Connections that may be sending a first request's head at once; more are refused."""


@dataclass
class Listening:
    """The listening server and the connections still sending their first head."""

    server: asyncio.base_events.Server
    pending: set[HeadGuard] = field(default_factory=set)

    def close(self) -> None:
        self.server.close()


class HeadGuard(asyncio.Protocol):
    """aiohttp's request handler behind a deadline on the first request's head."""

    def __init__(self, inner: Any, limits: HeadLimits, pending: set[HeadGuard]) -> None:
        self._inner = inner
        self._limits = limits
        self._pending = pending
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if len(self._pending) >= self._limits.max_pending:
            self._refused = True
            log.debug("refused a connection from %s: %d connections are still sending a "
                      "request head", transport.get_extra_info("peername"), len(self._pending))
            transport.abort()
            return
        self._pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(self._limits.timeout_s, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            window = self._tail + data
            if HEAD_END in window:
                self._head_in()
            else:
                self._tail = window[-(len(HEAD_END) - 1):]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._refused else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_in()
        if not self._refused:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _head_in(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.discard(self)

    def _expire(self) -> None:
        self._timer = None
        self._pending.discard(self)
        assert self._transport is not None
        log.info("closed a connection from %s: no complete request head within %g s",
                 self._transport.get_extra_info("peername"), self._limits.timeout_s)
        self._transport.abort()


class MsgpackErrors(RequestHandler):
    """aiohttp's request handler, answering what it cannot parse with our error body.

    aiohttp answers a request it could not parse (and a failure outside every handler) from
    `handle_error`, as text/plain; this answers the same status with the documented msgpack
    body. aiohttp builds its handlers itself and has no hook for that answer, so `listen`
    gives each new handler this class (it adds no state: `__slots__` is empty).
    """

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own first: it logs (http_log.py makes a parse error one WARNING line) and
        # refuses when part of an answer went out already.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            answer = error_response(status, "internal_error",
                                    "the server failed on this request; retry")
        else:
            detail = " ".join(str(getattr(exc, "message", None) or exc or message).split())
            answer = error_response(status, "malformed_http",
                                    f"the request line or headers could not be parsed ({detail}); "
                                    "send HTTP/1.1 (RFC 9112); the connection is closed")
        answer.force_close()
        return answer


def app_runner(app: web.Application) -> web.AppRunner:
    """The runner of the server's application, as `listen` serves it: no access log, no signal
    handlers of aiohttp's own, aiohttp's request log through http_log.py."""
    return web.AppRunner(app, access_log=None, handle_signals=False, logger=http_logger())


async def listen(runner: web.AppRunner, sock: socket.socket, context: ssl.SSLContext | None,
                 limits: HeadLimits) -> Listening:
    """Serve `runner`'s application (set up already) on the bound `sock`."""
    handlers = runner.server
    assert handlers is not None, "runner.setup() first"
    pending: set[HeadGuard] = set()

    def connection() -> HeadGuard:
        inner = handlers()
        inner.__class__ = MsgpackErrors  # see MsgpackErrors
        return HeadGuard(inner, limits, pending)

    server = await asyncio.get_running_loop().create_server(connection, sock=sock, ssl=context)
    return Listening(server, pending)
