"""A counting HTTP reverse proxy: the real body bytes each client sends and receives.

Neither the client nor the server counts its traffic, and counting inside them would only
show what they think they sent. Each demo client talks to its own proxy port, so the
proxy sees exactly the HTTP bodies on that client's wire (msgpack requests, replies,
long-poll `wait` answers, retries) and counts them per request path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

# Headers that describe one hop's connection, not the message (RFC 9110 7.6.1).
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                "proxy-authorization", "proxy-authenticate", "host", "content-length"}
_CHUNK = 1 << 20


@dataclass
class TrafficCount:
    """Body bytes through one proxy, in total and per route (first two path segments)."""

    bytes_up: int = 0
    """Request bodies: client -> server."""
    bytes_down: int = 0
    """Response bodies: server -> client."""
    requests: int = 0
    by_route: dict[str, list[int]] = field(default_factory=dict)
    """route -> [requests, bytes_up, bytes_down]."""

    def add(self, route: str, up: int, down: int) -> None:
        self.bytes_up += up
        self.bytes_down += down
        self.requests += 1
        row = self.by_route.setdefault(route, [0, 0, 0])
        row[0] += 1
        row[1] += up
        row[2] += down


def route_of(path: str) -> str:
    """`/v1/rounds/7/reports` -> `/v1/rounds/*/reports`: round numbers would split the counts."""
    return "/".join("*" if part.isdigit() else part for part in path.split("/"))


class CountingProxy:
    """Forwards every request to `upstream` and counts the bodies both ways."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.count = TrafficCount()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> str:
        """Listen on a free port; returns the URL a client should use."""
        # No read timeout: long-polls legitimately wait for tens of seconds.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                              auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Stream both bodies through, counting them: a fedavg upload or download is the
        model's size (hundreds of MB), too big to hold in the proxy."""
        assert self._session is not None
        route = route_of(request.path)
        sent = 0

        async def request_body() -> AsyncIterator[bytes]:
            nonlocal sent
            async for chunk in request.content.iter_chunked(_CHUNK):
                sent += len(chunk)
                yield chunk

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        data = request_body() if request.body_exists else None
        response_started = False
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs,
                                             data=data, headers=headers) as upstream:
                out_headers = {k: v for k, v in upstream.headers.items()
                               if k.lower() not in _HOP_HEADERS}
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                response_started = True
                received = 0
                try:
                    async for chunk in upstream.content.iter_chunked(_CHUNK):
                        received += len(chunk)
                        await response.write(chunk)
                    await response.write_eof()
                finally:
                    self.count.add(route, sent, received)
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if response_started:
                raise  # mid-body: dropping the connection is what the client would see
            # The client sees what it would see with the server gone: a 502 it retries.
            self.count.add(route, sent, 0)
            return web.Response(status=502, text=f"demo proxy: upstream unreachable: {exc}")
