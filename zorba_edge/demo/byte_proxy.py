"""A counting HTTP reverse proxy: the real body bytes each client sends and receives.

Neither the client nor the server counts its traffic, and counting inside them would only
show what they think they sent. Each demo client talks to its own proxy port, so the
proxy sees exactly the HTTP bodies on that client's wire (msgpack requests, replies,
long-poll `wait` answers, retries) and counts them per request path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

# Headers that describe one hop's connection, not the message (RFC 9110 7.6.1).
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                "proxy-authorization", "proxy-authenticate", "host", "content-length"}


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
        app = web.Application(client_max_size=64 * 2**20)
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
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs,
                                             data=body or None, headers=headers) as upstream:
                reply = await upstream.read()
                out_headers = {k: v for k, v in upstream.headers.items()
                               if k.lower() not in _HOP_HEADERS}
                status = upstream.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # The client sees what it would see with the server gone: a 502 it retries.
            self.count.add(route_of(request.path), len(body), 0)
            return web.Response(status=502, text=f"demo proxy: upstream unreachable: {exc}")
        self.count.add(route_of(request.path), len(body), len(reply))
        return web.Response(status=status, body=reply, headers=out_headers)
