"""The HTTP API (aiohttp): routing, body limits, auth, and msgpack errors for every refusal.

Handlers only translate HTTP to coordinator calls; state hangs on the application
(`app[SERVICES]`), never in globals. Any refusal, whoever raises it (our validation,
the coordinator, or aiohttp itself for an unknown route or an oversized body), leaves as
a 4xx with the msgpack body {"error": code, "message": ...}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from zorba_common.codec import CONTENT_TYPE, SchemaError, decode, encode
from zorba_common.limits import MAX_COUNTER, MAX_REGISTER_BYTES, MAX_REPORT_BYTES, MAX_WEIGHTS_BYTES
from zorba_common.messages import ErrorBody, RegisterRequest, Report
from zorba_common.weight_files import VERSION_HEADER, WEIGHTS_CONTENT_TYPE
from zorba_server import errors, metrics, run_lock, status_page
from zorba_server.config import ServerConfig
from zorba_server.coordinator import Coordinator
from zorba_server.engine import SolveFn
from zorba_server.enrolment_limit import EnrolmentLimiter
from zorba_server.errors import Refusal
from zorba_server.members import Member
from zorba_server.storage import Store, StoreUnavailableError, open_store

log = logging.getLogger("zorba_server")
M = TypeVar("M")


@dataclass
class Services:
    """What the handlers use; filled in when the application starts."""

    config: ServerConfig
    solve: SolveFn | None = None
    clock: Callable[[], float] = time.time
    metrics: metrics.Metrics = field(default_factory=metrics.Metrics)
    store: Store | None = None
    coordinator: Coordinator | None = None
    enrolments: EnrolmentLimiter = field(default_factory=EnrolmentLimiter)
    """Failed enrolments per source address (429 with Retry-After past a few)."""

    @property
    def running(self) -> Coordinator:
        if self.coordinator is None:
            raise errors.starting()
        return self.coordinator


SERVICES = web.AppKey("services", Services)


def create_app(config: ServerConfig, *, solve: SolveFn | None = None,
               clock: Callable[[], float] = time.time) -> web.Application:
    """The server; `solve` defaults to the run mode's (config.run.mode)."""
    # aiohttp refuses bodies over client_max_size itself (413, turned into msgpack by the
    # middleware); each endpoint then applies its own, smaller limit.
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_REPORT_BYTES)
    app[SERVICES] = Services(config, solve, clock)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/clients", register)
    app.router.add_get("/v1/rounds/next", next_round)
    app.router.add_post(r"/v1/rounds/{round:\d+}/reports", submit_report)
    app.router.add_put(r"/v1/rounds/{round:\d+}/weights", upload_weights)
    app.router.add_get("/v1/weights", download_weights)
    app.router.add_post("/v1/leave", leave)
    app.router.add_get("/v1/state", state)
    app.router.add_get("/v1/status", status_json)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    storage = services.config.storage
    # One server per run: the lock comes before the store is opened, checked or resumed.
    lock = run_lock.acquire(storage.path)
    try:
        store = await open_store(storage.path, storage.synchronous)
    except BaseException:
        lock.release()
        raise
    try:
        coordinator = Coordinator(services.config, store, solve=services.solve,
                                  clock=services.clock)
        await coordinator.start()
    except BaseException:
        await store.close()
        lock.release()
        raise
    services.store, services.coordinator = store, coordinator
    services.metrics.watch(coordinator, store.stats)
    try:
        yield
    finally:
        services.metrics.unwatch()
        services.coordinator = None
        try:
            await coordinator.stop()
            await store.close()
        finally:
            lock.release()


# ---------------------------------------------------------------------------- plumbing


def msgpack_response(message: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(message), status=status, content_type=CONTENT_TYPE)


def error_response(status: int, code: str, message: str) -> web.Response:
    return msgpack_response(ErrorBody(code, message[:4096]), status)


HTTP_STATUS: dict[type[Refusal], int] = {
    errors.Malformed: 400, errors.Unauthenticated: 401, errors.Forbidden: 403,
    errors.NotFound: 404, errors.Conflict: 409, errors.TooLarge: 413,
    errors.UnsupportedMediaType: 415, errors.Unprocessable: 422, errors.TooManyRequests: 429,
    errors.Unavailable: 503,
}
"""Each kind of refusal's HTTP status: the one place the server speaks HTTP about errors."""

_AIOHTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    services = request.app[SERVICES]
    stats = services.metrics.requests
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    headers: dict[str, str] = {}
    try:
        response = await handler(request)
        stats.answered(route, request.method, response.status, time.perf_counter() - started)
        _count_traffic(services, request, route, response)
        return response
    except errors.TooManyRequests as exc:
        status, code, message = 429, exc.code, exc.message
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    except Refusal as exc:
        status, code, message = HTTP_STATUS[type(exc)], exc.code, exc.message
    except SchemaError as exc:
        status = {"too_large": 413, "invalid_scalar": 422}.get(exc.code, 400)
        code, message = exc.code, str(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, code = exc.status, _AIOHTTP_CODES.get(exc.status, "http_error")
        message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 413:
            message += f" ({exc.text})"
    except StoreUnavailableError:
        log.exception("storage failed during %s %s", request.method, request.path)
        status, code = 503, "storage_unavailable"
        message = "the server could not store the request: nothing was saved; retry"
    except Exception:
        log.exception("unexpected failure during %s %s", request.method, request.path)
        status, code = 500, "internal_error"
        message = "the server failed on this request; retry (a report: with the same key)"
    stats.answered(route, request.method, status, time.perf_counter() - started, refusal=code)
    response = error_response(status, code, message)
    response.headers.update(headers)
    _count_traffic(services, request, route, response)
    return response


async def read_message(request: web.Request, cls: type[M], limit: int) -> M:
    if request.content_type != CONTENT_TYPE:
        raise errors.unsupported_media_type(
            f"send the body as {CONTENT_TYPE}, not {request.content_type or 'nothing'}")
    if request.content_length is not None and request.content_length > limit:
        raise errors.too_large(f"body of {request.content_length} bytes exceeds the "
                               f"{limit}-byte limit of {cls.__name__}")
    body = await request.read()
    request[BODY_BYTES] = len(body)
    return decode(cls, body, max_bytes=limit)


def json_response(data: Any, status: int = 200) -> web.Response:
    """Strict JSON, the only way this server answers in JSON.

    json.dumps would write a non-finite float as `Infinity` or `NaN`, which no JSON parser
    has to accept: those become null (a value that is not known), and allow_nan=False makes
    any that slipped through a server error here rather than a broken document there.
    """
    text = json.dumps(_finite(data), allow_nan=False)
    return web.Response(text=text, status=status, content_type="application/json")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def path_round(request: web.Request) -> int:
    """The round number of the path, refused unless it is one a round can have.

    The route's `\\d+` also matches non-ASCII digits (which int() reads) and numbers beyond
    what storage and hashing take (a 64-bit overflow was a 500), so it is checked here,
    before anything reaches the coordinator.
    """
    raw = request.match_info["round"]
    if raw.isascii() and len(raw) <= len(str(MAX_COUNTER)) and 1 <= int(raw) <= MAX_COUNTER:
        return int(raw)
    shown = raw if len(raw) <= 24 else raw[:20] + "..."
    raise errors.not_found("unknown_round",
                           f"round {shown!r} does not exist: rounds are numbered 1 to "
                           f"{MAX_COUNTER} in ASCII digits; poll GET /v1/rounds/next for yours")


CLIENT_ID = web.RequestKey("client_id", str)
BODY_BYTES = web.RequestKey("body_bytes", int)
"""The request body's bytes as read (a chunked body has no Content-Length: it counted 0)."""
"""Request key: the authenticated client, whose body bytes the middleware counts."""
REPORT_ROUTE = "/v1/rounds/{round}/reports"


def authenticated(request: web.Request, coordinator: Coordinator) -> Member:
    member = coordinator.authenticate(bearer(request))
    request[CLIENT_ID] = member.client_id
    return member


def _count_traffic(services: Services, request: web.Request, route: str,
                   response: web.StreamResponse) -> None:
    coordinator = services.coordinator
    client_id = request.get(CLIENT_ID)
    if coordinator is None or client_id is None:
        return
    if route == REPORT_ROUTE and response.status == 200:
        return  # the coordinator counted the report and its ack (their round's row stores them)
    coordinator.count_traffic(client_id, request.get(BODY_BYTES, request.content_length or 0),
                              response.content_length or 0)


def bearer(request: web.Request) -> str | None:
    """The request's bearer token. Two Authorization headers are refused: the first won, so a
    proxy that adds its own and a client's could act as whichever came first."""
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise errors.bad_request("duplicate_authorization",
                                 "send one Authorization header (Bearer <token>), not several")
    scheme, _, token = (headers[0] if headers else "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _query_number(request: web.Request, name: str, default: float, *, integer: bool) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    value: float = -1
    if not integer:
        # ASCII only: float() also reads other scripts' digits ("٣" is 3).
        with contextlib.suppress(ValueError):
            value = float(raw) if raw.isascii() else -1
    elif raw.isascii() and raw.isdigit() and len(raw) <= len(str(MAX_COUNTER)):
        value = int(raw)
    if value < 0 or not math.isfinite(value) or (integer and value > MAX_COUNTER):
        kind = (f"an integer from 0 to {MAX_COUNTER}" if integer
                else "a non-negative number of seconds")
        raise errors.bad_request("bad_query", f"query parameter {name}={raw!r}: expected {kind}")
    return value


# ---------------------------------------------------------------------------- handlers


async def register(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    coordinator = services.running
    # Per source address: a guesser waits out a growing delay before its secret is compared.
    source, now = request.remote or "unknown", services.clock()
    try:
        services.enrolments.check(source, now)
    except errors.TooManyRequests:
        services.metrics.requests.enrolment_failures.labels("throttled").inc()
        raise
    message = await read_message(request, RegisterRequest, MAX_REGISTER_BYTES)
    try:
        answer = await coordinator.register(message)
    except errors.Forbidden:
        services.metrics.requests.enrolment_failures.labels("wrong_secret").inc()
        delay = services.enrolments.failed(source, now)
        if delay:
            log.warning("wrong enrolment secret from %s again: its registrations wait %.0f s",
                        source, delay)
        raise
    services.enrolments.succeeded(source)
    return msgpack_response(answer, status=201)


async def next_round(request: web.Request) -> web.Response:
    coordinator = request.app[SERVICES].running
    member = authenticated(request, coordinator)
    version = int(_query_number(request, "version", 0, integer=True))
    wait = _query_number(request, "wait", coordinator.config.run.poll_timeout_s, integer=False)
    return msgpack_response(await coordinator.next_round(member, version, wait))


async def submit_report(request: web.Request) -> web.Response:
    coordinator = request.app[SERVICES].running
    member = authenticated(request, coordinator)
    round_ = path_round(request)
    report = await read_message(request, Report, MAX_REPORT_BYTES)
    ack = await coordinator.submit_report(member, round_, report, body_bytes=request[BODY_BYTES])
    return web.Response(body=ack, content_type=CONTENT_TYPE)


async def healthz(request: web.Request) -> web.Response:
    """200 `ok` once the run is loaded and its round driver runs (503 while starting): for a
    load balancer or an orchestrator's probe. Cheap: no store access."""
    coordinator = request.app[SERVICES].running
    if not coordinator.driving:
        raise errors.Unavailable("round_driver_stopped", "the round driver is not running")
    return web.Response(text="ok\n")


async def leave(request: web.Request) -> web.Response:
    """The client stops taking part: not counted active from now on (204, no body)."""
    coordinator = request.app[SERVICES].running
    member = authenticated(request, coordinator)
    if request.body_exists:  # no body is read: a 50 MiB one was accepted and discarded
        raise errors.too_large("POST /v1/leave takes no body")
    await coordinator.leave(member)
    return web.Response(status=204)


async def upload_weights(request: web.Request) -> web.Response:
    """fedavg: a client's trained block weights (safetensors), streamed to disk."""
    coordinator = request.app[SERVICES].running
    member = authenticated(request, coordinator)
    round_ = path_round(request)
    if request.content_type != WEIGHTS_CONTENT_TYPE:
        raise errors.unsupported_media_type(
            f"send the weights as {WEIGHTS_CONTENT_TYPE}, not "
                       f"{request.content_type or 'nothing'}")
    if request.content_length is not None and request.content_length > MAX_WEIGHTS_BYTES:
        raise errors.too_large(f"weights of {request.content_length} bytes exceed the "
                               f"{MAX_WEIGHTS_BYTES}-byte limit")
    request[BODY_BYTES] = await coordinator.receive_weights(
        member, round_, request.content.iter_chunked(1 << 20))
    return web.Response(status=204)


async def download_weights(request: web.Request) -> web.StreamResponse:
    """fedavg: the current global block weights, with their version in X-Zorba-Version."""
    coordinator = request.app[SERVICES].running
    authenticated(request, coordinator)
    path, version = coordinator.weights_file()
    return web.FileResponse(path, headers={"Content-Type": WEIGHTS_CONTENT_TYPE,
                                           VERSION_HEADER: str(version)})


async def state(request: web.Request) -> web.Response:
    coordinator = request.app[SERVICES].running
    authenticated(request, coordinator)
    return web.Response(body=coordinator.state(), content_type=CONTENT_TYPE)


async def status_json(request: web.Request) -> web.Response:
    return json_response(request.app[SERVICES].running.status())


async def metrics_text(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    _ = services.running  # 503 while the server is starting, like every other endpoint
    return web.Response(body=services.metrics.render(),
                        headers={"Content-Type": metrics.CONTENT_TYPE})


async def index(request: web.Request) -> web.Response:
    page = status_page.render(request.app[SERVICES].running.status())
    return web.Response(text=page, content_type="text/html")
