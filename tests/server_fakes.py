"""Fake clients and fixtures shared by the server tests (not a test module itself)."""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from zorba_common.codec import CONTENT_TYPE, decode, encode
from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import (
    AlphaState,
    Assignment,
    DeviceProfile,
    NextRound,
    RegisterRequest,
    RegisterResponse,
    Report,
    ReportAck,
)

SECRET = "test-enrolment-secret"
FINGERPRINT = "tiny-llama-4x1000"
FOOTPRINT = ModelFootprint(
    block_params=(1000, 1000, 1000, 1000),
    quantizable_block_params=(900, 900, 900, 900),
    embed_head_params=5000,
    hidden_size=16,
    vocab_size=100,
    num_layers=4,
    intermediate_size=32,
)
BIG = 1 << 40


def profile(samples: int = 100, *, budget: int = 2**32, fingerprint: str = FINGERPRINT,
            footprint: ModelFootprint = FOOTPRINT, step_time_s: float = 0.01,
            name: str = "", base_rms: tuple[float, ...] | None = None,
            fluency_curvature: float | None = None) -> DeviceProfile:
    return DeviceProfile("cpu", budget, step_time_s, samples, footprint, fingerprint, name=name,
                         base_rms=base_rms, fluency_curvature=fluency_curvature)


def config_dict(db: Path, **run: Any) -> dict[str, Any]:
    # One lr for every client, so expected alphas are lr x the mean of the reported scalars;
    # the per-client step scale has its own tests (test_round_engine.py). No grace after the
    # deadline: rounds close at it (the grace has its own tests there too).
    defaults = {"pool_size": 64, "min_clients": 1, "min_reports": 1, "round_duration_s": 30.0,
                "max_steps": 8, "lr": 0.01, "poll_timeout_s": 5.0, "lr_scaling": "none",
                "report_grace_s": 0.0}
    return {"enrolment_secret": SECRET, "storage": {"path": str(db)}, "run": defaults | run}


def make_report(assignment: Assignment, grads: list[float] | None = None, *,
                key: str | None = None, peak: int = 0, loss: float = 1.0,
                loss_generic: float | None = None) -> Report:
    ks = assignment.pool_indices
    grads = grads if grads is not None else [0.1 * (t + 1) for t in range(len(ks))]
    return Report(
        idempotency_key=key or uuid.uuid4().hex,
        base_version=assignment.base_version,
        steps=tuple(zip(ks, grads, strict=False)),
        num_samples=8,
        loss_mean=loss,
        loss_last=loss,
        peak_memory_bytes=peak,
        step_time_s=0.01,
        loss_generic=loss_generic,
    )


@dataclass
class Answer:
    status: int
    body: Any
    """Decoded message on success, the error dict otherwise."""

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None


class FakeClient:
    """A device speaking protocol v1 through an aiohttp client (test client or session)."""

    def __init__(self, http: Any) -> None:
        self.http = http
        self.client_id = ""
        self.token = ""
        self.version = 0
        self.alpha: np.ndarray | None = None

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def register(self, prof: DeviceProfile | None = None, secret: str = SECRET) -> Answer:
        answer = await post(self.http, "/v1/clients", RegisterRequest(secret, prof or profile()),
                            RegisterResponse)
        if answer.status == 201:
            self.client_id, self.token = answer.body.client_id, answer.body.token
            run = answer.body.run
            self.alpha = np.zeros((run.pool_size, run.num_blocks))
        return answer

    async def poll(self, wait: float = 5.0) -> NextRound:
        """Long-poll and apply the deltas it brings (as a real client would)."""
        resp = await self.http.get(f"/v1/rounds/next?version={self.version}&wait={wait}",
                                   headers=self._auth())
        body = await resp.read()
        assert resp.status == 200, (resp.status, msgpack.unpackb(body))
        answer = decode(NextRound, body, max_bytes=BIG)
        if answer.catch_up:
            state = await self.state()
            self.alpha, self.version = state.matrix().copy(), state.version
        for delta in answer.deltas:
            assert delta.version == self.version + 1
            assert self.alpha is not None
            for k, b, value in delta.entries():
                self.alpha[k, b] += value
            self.version = delta.version
        return answer

    async def report(self, round_: int, report: Report) -> Answer:
        return await post(self.http, f"/v1/rounds/{round_}/reports", report, ReportAck,
                          headers=self._auth())

    async def state(self) -> AlphaState:
        resp = await self.http.get("/v1/state", headers=self._auth())
        assert resp.status == 200
        return decode(AlphaState, await resp.read(), max_bytes=BIG)


async def post(http: Any, path: str, message: Any, reply: type, *,
               headers: dict[str, str] | None = None, raw: bytes | None = None,
               content_type: str = CONTENT_TYPE) -> Answer:
    data = raw if raw is not None else encode(message)
    headers = {"Content-Type": content_type, **(headers or {})}
    resp = await http.post(path, data=data, headers=headers)
    body = await resp.read()
    if 200 <= resp.status < 300:
        return Answer(resp.status, decode(reply, body, max_bytes=BIG))
    assert resp.content_type == CONTENT_TYPE, (resp.status, body[:200])
    return Answer(resp.status, msgpack.unpackb(body))


def db_fingerprint(location: Path | str) -> dict[str, Any]:
    """Everything durable, summarised: used to prove a refused request changed nothing.

    `location`: a SQLite file or a `postgresql://` URL (the two stores the server runs on)."""
    postgres = str(location).startswith("postgresql://")
    if postgres:
        import psycopg

        conn: Any = psycopg.connect(str(location))
        statuses = "SELECT string_agg(status, ',' ORDER BY round) FROM rounds"
    else:
        conn = sqlite3.connect(str(location))
        statuses = "SELECT group_concat(status) FROM (SELECT status FROM rounds ORDER BY round)"
    try:
        out: dict[str, Any] = {}
        for table in ("clients", "rounds", "reports", "increments"):
            out[table] = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        version, alpha = conn.execute("SELECT version, alpha FROM run").fetchone()
        out["version"] = version
        out["alpha"] = hashlib.sha256(bytes(alpha or b"")).hexdigest()
        out["round_status"] = conn.execute(statuses).fetchone()[0]
        return out
    finally:
        conn.close()
