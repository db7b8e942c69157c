"""The client side of protocol v1: msgpack bodies, a bearer token, retries while the server is away.

Every request is encoded once and resent byte for byte on a retry, so a report retried
after a lost answer carries the same idempotency key and content and gets the same ack.
What is retried: connection failures, timeouts, 429 and 5xx answers (the server is
starting, restarting or overloaded). What is not: any other 4xx (the request itself is
wrong; it raises ServerRefusedError with the server's code and advice) and TLS
certificate failures (they will not fix themselves; the message points at --ca-cert).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgpack

from zorba_common.codec import CONTENT_TYPE, SchemaError, decode, encode, from_wire
from zorba_common.limits import MAX_RESPONSE_BYTES, MAX_WEIGHTS_BYTES
from zorba_common.messages import (
    AlphaState,
    ErrorBody,
    NextRound,
    RegisterRequest,
    RegisterResponse,
    Report,
    ReportAck,
)
from zorba_common.weight_files import VERSION_HEADER, WEIGHTS_CONTENT_TYPE
from zorba_edge.client.backoff import Backoff
from zorba_edge.client.errors import ServerRefusedError, ServerUnavailableError, UsageError
from zorba_edge.client.older_server import unknown_fields, without_unknown

log = logging.getLogger("zorba_edge.client")
M = TypeVar("M")

TOKEN_ENV = "ZORBA_CLIENT_TOKEN"
"""A client's bearer token for `export` and `eval` when no state file is at hand."""
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REQUEST_TIMEOUT_S = 60.0
"""Longest any request may take, on top of a long-poll's own wait."""
WEIGHTS_TIMEOUT_S = 600.0
"""Extra time for a fedavg weight transfer (hundreds of MB on a slow link)."""


@dataclass(frozen=True)
class RetryNotice:
    """What a retry callback is told."""

    path: str
    attempt: int
    delay_s: float
    outage_s: float
    reason: str


@dataclass(frozen=True)
class _Reply:
    body: bytearray
    headers: Mapping[str, str]


class _Retryable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalize_url(url: str) -> str:
    """`http(s)://host[:port][/prefix]` without a trailing slash, or UsageError."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(
            f"--server {url!r} is not a server URL: write http://HOST:PORT or https://HOST:PORT")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def ssl_context(ca_cert: str | None) -> ssl.SSLContext | None:
    """Trust the system's CAs, plus `ca_cert` for a server with its own CA."""
    if ca_cert is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_cert)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"--ca-cert {ca_cert}: cannot load it as a PEM CA certificate ({exc})") from None


class ServerClient:
    """An aiohttp session to one server. Use as `async with ServerClient(url) as client:`."""

    def __init__(self, base_url: str, *, token: str | None = None, ca_cert: str | None = None,
                 backoff: Backoff | None = None, rng: random.Random | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 on_retry: Callable[[RetryNotice], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = normalize_url(base_url)
        self.token = token
        self.backoff = backoff or Backoff()
        self._ssl = ssl_context(ca_cert)
        self._rng = rng or random.Random()
        self._timeout_s = request_timeout_s
        self._on_retry = on_retry or _log_retry
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ServerClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        self._session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------------ endpoints

    async def register(self, request: RegisterRequest) -> RegisterResponse:
        """Register; an older server that refuses an optional profile field it does not know
        is asked again without it (older_server.py)."""
        try:
            return await self._call("POST", "/v1/clients", RegisterResponse, body=encode(request),
                                    auth=False)
        except ServerRefusedError as exc:
            plainer = without_unknown(request, exc)
            if plainer is None:
                raise
            log.warning("the server does not know the profile field(s) %s (an older zorba-server): "
                        "registering without them; its drift bound gets no base-weight RMS from "
                        "this client", ", ".join(unknown_fields(exc)))
            return await self._call("POST", "/v1/clients", RegisterResponse,
                                    body=encode(plainer), auth=False)

    async def next_round(self, version: int, wait_s: float) -> NextRound:
        query = {"version": str(version), "wait": f"{wait_s:g}"}
        return await self._call("GET", "/v1/rounds/next", NextRound, query=query,
                                extra_timeout_s=wait_s)

    async def report(self, round_: int, report: Report) -> ReportAck:
        """Post a report; retries resend the same bytes (same idempotency key)."""
        return await self._call("POST", f"/v1/rounds/{round_}/reports", ReportAck,
                                body=encode(report))

    async def state(self) -> AlphaState:
        return await self._call("GET", "/v1/state", AlphaState)

    async def leave(self, timeout_s: float) -> None:
        """POST /v1/leave: this client stops, so rounds need not wait for it. One try within
        `timeout_s`, no retries: a stopping client must not hang on a server that is away
        (the server then counts it gone after its membership timeout, as before)."""
        try:
            await asyncio.wait_for(self._once("POST", "/v1/leave", None, None, True, 0.0,
                                              CONTENT_TYPE, MAX_RESPONSE_BYTES), timeout_s)
        except _Retryable as exc:
            raise ServerUnavailableError(f"the server did not hear the leave: {exc.reason}") from None

    async def weights(self) -> tuple[bytearray, int]:
        """fedavg: the global block weights (safetensors) and the version they belong to."""
        reply = await self._request("GET", "/v1/weights", body=None, query=None, auth=True,
                                    extra_timeout_s=WEIGHTS_TIMEOUT_S,
                                    max_bytes=MAX_WEIGHTS_BYTES)
        try:
            version = int(reply.headers[VERSION_HEADER])
        except (KeyError, ValueError):
            raise SchemaError(f"GET /v1/weights answered without a valid {VERSION_HEADER} header: "
                              "are client and server the same zorba-edge version?") from None
        return reply.body, version

    async def upload_weights(self, round_: int, body: bytes) -> int:
        """fedavg: the round's trained block weights; a retry resends the same bytes.
        Returns the bytes sent."""
        await self._request("PUT", f"/v1/rounds/{round_}/weights", body=body, query=None,
                            auth=True, extra_timeout_s=WEIGHTS_TIMEOUT_S,
                            content_type=WEIGHTS_CONTENT_TYPE)
        return len(body)

    async def status(self) -> dict[str, Any]:
        """GET /v1/status (JSON for people; the run's seed and id are in it)."""
        reply = await self._request("GET", "/v1/status", body=None, query=None, auth=False,
                                    extra_timeout_s=0.0)
        try:
            value = json.loads(reply.body)
        except ValueError:
            raise SchemaError(f"{self.base_url}/v1/status did not answer JSON: is this a "
                              "zorba-edge server?") from None
        if not isinstance(value, dict):
            raise SchemaError(
                f"{self.base_url}/v1/status answered {type(value).__name__}, not an object")
        return value

    # ------------------------------------------------------------------------ plumbing

    async def _call(self, method: str, path: str, reply: type[M], *, body: bytes | None = None,
                    query: dict[str, str] | None = None, auth: bool = True,
                    extra_timeout_s: float = 0.0) -> M:
        answer = await self._request(method, path, body=body, query=query, auth=auth,
                                     extra_timeout_s=extra_timeout_s)
        try:
            return decode(reply, bytes(answer.body), max_bytes=MAX_RESPONSE_BYTES)
        except SchemaError as exc:
            raise SchemaError(
                f"the server's answer to {method} {path} is not a valid {reply.__name__} ({exc}): "
                "are client and server the same zorba-edge version?", code=exc.code) from None

    async def _request(self, method: str, path: str, *, body: bytes | None,
                       query: dict[str, str] | None, auth: bool, extra_timeout_s: float,
                       content_type: str = CONTENT_TYPE,
                       max_bytes: int = MAX_RESPONSE_BYTES) -> _Reply:
        attempt = 0
        outage_started: float | None = None
        while True:
            try:
                return await self._once(method, path, body, query, auth, extra_timeout_s,
                                        content_type, max_bytes)
            except _Retryable as exc:
                now = self._clock()
                outage_started = now if outage_started is None else outage_started
                outage = now - outage_started
                delay = self.backoff.next_delay(attempt, outage, self._rng)
                if delay is None:
                    raise ServerUnavailableError(
                        f"gave up on {self.base_url}{path} after {outage:.0f} s of failures "
                        f"(last: {exc.reason}). Check that the server runs and the URL is right; "
                        "nothing was lost: restart the client to resume"
                    ) from None
                self._on_retry(RetryNotice(path, attempt, delay, outage, exc.reason))
                attempt += 1
                await asyncio.sleep(delay)

    async def _once(self, method: str, path: str, body: bytes | None,
                    query: dict[str, str] | None, auth: bool, extra_timeout_s: float,
                    content_type: str, max_bytes: int) -> _Reply:
        if self._session is None:
            raise RuntimeError("ServerClient used outside `async with`")
        headers = {"Accept": f"{CONTENT_TYPE}, {WEIGHTS_CONTENT_TYPE}"}
        if body is not None:
            headers["Content-Type"] = content_type
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        timeout = aiohttp.ClientTimeout(total=self._timeout_s + extra_timeout_s)
        try:
            async with self._session.request(method, self.base_url + path, data=body,
                                             params=query, headers=headers,
                                             timeout=timeout) as response:
                # content.read(n) returns what is buffered so far, not n bytes: read to the
                # end (a 245 KB alpha table arrives in several chunks), stopping past the cap.
                # One buffer, sized up front when the length is known: a fedavg download is
                # the model's size and must not be held twice.
                raw = bytearray()
                expected = response.content_length
                if expected is not None and expected <= max_bytes:
                    raw = bytearray(expected)
                    view, filled = memoryview(raw), 0
                    async for chunk in response.content.iter_chunked(1 << 20):
                        end = filled + len(chunk)
                        if end > expected:
                            raise _Retryable("the answer ran past its Content-Length")
                        view[filled:end] = chunk
                        filled = end
                    del view
                    if filled != expected:
                        raise _Retryable(f"the answer ended after {filled} of {expected} bytes")
                else:
                    async for chunk in response.content.iter_chunked(1 << 16):
                        raw += chunk
                        if len(raw) > max_bytes:
                            break
                status, reply_headers = response.status, response.headers
        except aiohttp.ClientSSLError as exc:
            raise ServerUnavailableError(
                f"TLS with {self.base_url} failed ({exc}): if the server uses its own CA, "
                "pass its certificate with --ca-cert FILE") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        except asyncio.TimeoutError:
            raise _Retryable(f"no answer within {timeout.total:.0f} s") from None
        if status in RETRY_STATUSES:
            code, message = _error_of(bytes(raw[:4096]))
            raise _Retryable(f"HTTP {status} {code}: {message}")
        if status >= 400:
            code, message = _error_of(bytes(raw[:4096]))
            raise ServerRefusedError(status, code, message, path=path)
        if len(raw) > max_bytes:
            raise SchemaError(f"the answer to {path} exceeds {max_bytes} bytes", code="too_large")
        return _Reply(raw, reply_headers)


def _error_of(raw: bytes) -> tuple[str, str]:
    """(code, message) of an error body, or a snippet of whatever a proxy sent instead."""
    try:
        body = from_wire(ErrorBody, msgpack.unpackb(raw, raw=False))
        return body.error, body.message
    except (ValueError, TypeError, msgpack.UnpackException, SchemaError):
        text = raw[:200].decode("utf-8", "replace").strip()
        return "http_error", text or "(empty body)"


def _log_retry(notice: RetryNotice) -> None:
    # The first failure and every tenth after it at WARNING: an outage of hours stays readable.
    level = logging.WARNING if notice.attempt % 10 == 0 else logging.DEBUG
    log.log(level, "server unreachable on %s (%s): retry %d in %.1f s (outage %.0f s)",
            notice.path, notice.reason, notice.attempt + 1, notice.delay_s, notice.outage_s)
