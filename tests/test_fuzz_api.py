"""Property-based fuzzing of the real app: whatever bytes, headers and paths arrive, the
answer is a 4xx with an error body (never a 5xx), and a refusal changes nothing.

Hypothesis generates EXAMPLES x BATCH requests per run (derandomized, so CI sees the same
ones every run): random paths and methods, query strings, tokens and content types, random
bytes, random msgpack values, and valid reports and registrations with one field mutated,
dropped, added or repeated. After each request the database's counts and the open round
are compared with before; after each batch, /v1/state's bytes too. A request that was
legitimately accepted (2xx) moves the baseline instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fakes import SECRET, FakeClient, config_dict, make_report, profile

from zorba_common.codec import CONTENT_TYPE, encode
from zorba_common.messages import RegisterRequest
from zorba_server.app import SERVICES, create_app
from zorba_server.config import config_from_dict

EXAMPLES, BATCH = 1000, 10  # 10,000 requests per run

# -------------------------------------------------------------------- strategies

_ints = st.one_of(st.integers(-3, 300), st.integers(-2**63, 2**64 - 1),
                  st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, -2**63, 2**53, 2**31]))
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1e308, -1e308, 0.0, -0.0, 5e-324]))
_scalars = st.one_of(st.none(), st.booleans(), _ints, _floats, st.text(max_size=20),
                     st.binary(max_size=20))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)
_round_segments = st.one_of(
    st.integers(-5, 2**70).map(str), st.sampled_from(["1", "2", "0", "01", "١", "٣٣", "1e3"]),
    st.text(alphabet="0123456789", min_size=1, max_size=40),
    st.text(max_size=8).filter(lambda s: "/" not in s and "?" not in s and "#" not in s))
_queries = st.one_of(st.just(""), st.builds(
    lambda k, v: f"?{k}={v}", st.sampled_from(["version", "wait", "x"]),
    st.one_of(_ints.map(str), _floats.map(str), st.text(alphabet="0123456789-+._naife", max_size=12))))


@st.composite
def _path(draw: Any) -> str:
    template = draw(st.sampled_from([
        "/v1/clients", "/v1/rounds/next", "/v1/rounds/{r}/reports", "/v1/rounds/{r}/weights",
        "/v1/state", "/v1/weights", "/v1/status", "/metrics", "/", "/v1/{x}", "/{x}/{x}"]))
    r = draw(_round_segments)
    x = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", max_size=10))
    return template.format(r=r, x=x) + draw(_queries)


def _mutated(valid: dict[str, Any], draw: Any, nested: bool) -> bytes:
    body = dict(valid)
    target = body
    if nested and draw(st.booleans()):  # one level down: the profile / its footprint
        target = body["profile"] = dict(body["profile"])
        if draw(st.booleans()):
            target = target["footprint"] = dict(target["footprint"])
    key = draw(st.sampled_from(sorted(target)))
    how = draw(st.sampled_from(["replace", "drop", "add", "repeat"]))
    if how == "replace":
        target[key] = draw(_values)
    elif how == "drop":
        del target[key]
    elif how == "add":
        target[draw(st.text(max_size=12))] = draw(_values)
    data = msgpack.packb(body, use_bin_type=True)
    if how == "repeat" and target is body and len(body) < 15:  # the key again, at the end
        data = (bytes([0x80 | (len(body) + 1)]) + data[1:] + msgpack.packb(key)
                + msgpack.packb(draw(_values), use_bin_type=True))
    return data


@st.composite
def _request(draw: Any, world: dict[str, Any]) -> tuple[str, str, dict[str, str], bytes]:
    kind = draw(st.sampled_from(["report", "register", "random"]))
    if kind == "report":
        # A valid body to a strange round reaches the coordinator: it must still be refused.
        round_ = draw(st.one_of(st.sampled_from([world["round"], 1, 2]), _round_segments,
                                st.sampled_from([2**63, 2**64, 2**64 + 1, 2**53]).map(str)))
        method, path = "POST", f"/v1/rounds/{round_}/reports"
        body = (_mutated(world["report"], draw, nested=False) if draw(st.integers(0, 3))
                else msgpack.packb(world["report"], use_bin_type=True))
    elif kind == "register":
        method, path = "POST", "/v1/clients"
        body = _mutated(world["register"], draw, nested=True)
    else:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]))
        path = draw(_path())
        body = draw(st.one_of(st.binary(max_size=64),
                              _values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
    headers = {}
    token = draw(st.sampled_from(["valid", "valid", "none", "garbage"]))
    if token == "valid":
        headers["Authorization"] = f"Bearer {world['token']}"
    elif token == "garbage":
        headers["Authorization"] = draw(st.text(alphabet=st.characters(
            min_codepoint=32, max_codepoint=126), max_size=40))
    ctype = draw(st.sampled_from([CONTENT_TYPE, CONTENT_TYPE, "application/json",
                                  "application/vnd.zorba.safetensors", None]))
    if ctype is not None:
        headers["Content-Type"] = ctype
    return method, path, headers, body


# -------------------------------------------------------------------- the property


def _durable(conn: sqlite3.Connection) -> tuple[Any, ...]:
    counts = tuple(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                   for t in ("clients", "rounds", "reports", "increments"))
    version, alpha = conn.execute("SELECT version, alpha FROM run").fetchone()
    return counts + (version, hashlib.sha256(alpha or b"").hexdigest())


def _in_memory(app: Any) -> tuple[Any, ...]:
    c = app[SERVICES].coordinator
    received = tuple(sorted(c.engine.open.received)) if c.engine.open is not None else ()
    return (c.engine.version, c.engine.round_counter, len(c.engine.members), received)


@pytest.mark.slow
def test_no_request_crashes_the_server_and_no_refusal_changes_anything(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    db = tmp_path / "fuzz.sqlite3"
    app = create_app(config_from_dict(config_dict(db, min_clients=2, min_reports=2,
                                                  round_duration_s=3600.0, poll_timeout_s=0.05)))
    http = TestClient(TestServer(app), loop=loop)
    loop.run_until_complete(http.start_server())
    a, b = FakeClient(http), FakeClient(http)
    for c in (a, b):
        loop.run_until_complete(c.register(profile()))
    assignment = None
    for _ in range(200):  # polls answer within poll_timeout_s; the round opens in the background
        assignment = loop.run_until_complete(a.poll()).assignment
        if assignment is not None:
            break
    assert assignment is not None, "no round opened for the fuzzer"
    world = {"token": a.token, "round": assignment.round,
             "report": msgpack.unpackb(encode(make_report(assignment, key="fuzz"))),
             "register": msgpack.unpackb(encode(RegisterRequest(SECRET, profile())))}
    conn = sqlite3.connect(str(db))
    counts = {"requests": 0, "accepted": 0}

    async def state_bytes() -> bytes:
        resp = await http.get("/v1/state", headers={"Authorization": f"Bearer {b.token}"})
        assert resp.status == 200
        return await resp.read()

    async def send(method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        before = (_durable(conn), _in_memory(app))
        resp = await http.request(method, path, headers=headers, data=body,
                                  skip_auto_headers=("Content-Type",))
        data = await resp.read()
        counts["requests"] += 1
        where = f"{method} {path} {headers} {body[:80]!r}"
        assert resp.status < 500, (where, resp.status, data[:300])
        if resp.status < 400:
            counts["accepted"] += 1
            return
        assert resp.content_type == CONTENT_TYPE, where
        error = msgpack.unpackb(data) if method != "HEAD" else {"error": "x", "message": "x"}
        assert set(error) == {"error", "message"} and error["error"] and error["message"], where
        assert (_durable(conn), _in_memory(app)) == before, where

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(_request(world), min_size=BATCH, max_size=BATCH))
    def batch(requests: list[tuple[str, str, dict[str, str], bytes]]) -> None:
        async def run() -> None:
            state = await state_bytes()
            accepted = counts["accepted"]
            for request in requests:
                await send(*request)
            if counts["accepted"] == accepted:
                assert await state_bytes() == state

        loop.run_until_complete(run())

    try:
        batch()
    finally:
        conn.close()
        loop.run_until_complete(http.close())
        loop.close()
    assert counts["requests"] >= EXAMPLES * BATCH
    # Almost everything generated is invalid: a fuzzer that mostly succeeds tests nothing.
    assert counts["accepted"] < counts["requests"] // 5, counts
