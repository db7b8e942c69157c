"""The fedavg baseline on the server: weights up, the sample-weighted average down, refusals."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from safetensors.numpy import load, save
from server_fakes import FOOTPRINT, FakeClient, config_dict, profile

from zorba_common.messages import TRAIN, Assignment, Report
from zorba_common.weight_files import VERSION_HEADER, WEIGHTS_CONTENT_TYPE, tensor_key, version_path
from zorba_server.app import create_app
from zorba_server.config import config_from_dict

pytestmark = pytest.mark.asyncio


@pytest.fixture
def start(tmp_path: Path, aiohttp_client: Any) -> Any:
    db = tmp_path / "server.sqlite3"

    async def _start(**run: Any) -> Any:
        return await aiohttp_client(create_app(config_from_dict(config_dict(db, **run))))

    _start.db = db  # type: ignore[attr-defined]
    return _start


def block_weights(value: float) -> dict[str, np.ndarray]:
    """Every block of FOOTPRINT (1,000 parameters each) as a 600 + 400 split, all `value`."""
    out = {}
    for b in range(FOOTPRINT.num_layers):
        out[tensor_key(b, "mlp.weight")] = np.full((20, 30), value, np.float32)
        out[tensor_key(b, "attn.weight")] = np.full((400,), value, np.float32)
    return out


def fedavg_report(assignment: Assignment, samples: int = 8) -> Report:
    return Report(uuid.uuid4().hex, assignment.base_version, (), samples, 1.0, 1.0, 123, 0.5)


async def put_weights(c: FakeClient, round_: int, body: bytes,
                      ctype: str = WEIGHTS_CONTENT_TYPE) -> tuple[int, Any]:
    resp = await c.http.put(f"/v1/rounds/{round_}/weights", data=body,
                            headers={**c._auth(), "Content-Type": ctype})
    raw = await resp.read()
    return resp.status, (msgpack.unpackb(raw) if raw else None)


async def joined(http: Any, samples: list[int], budget: int = 2**20) -> list[FakeClient]:
    clients = []
    for i, n in enumerate(samples):
        c = FakeClient(http)
        # By default a budget far below the model: fedavg runs regardless, and the peak tells.
        answer = await c.register(profile(n, budget=budget, name=f"dev{i}"))
        assert answer.status == 201, answer.body
        clients.append(c)
    return clients


async def test_a_fedavg_round_serves_the_sample_weighted_average_of_the_uploads(start: Any) -> None:
    http = await start(mode="fedavg", min_clients=2, min_reports=2, keep_weight_versions=True)
    a, b = await joined(http, [100, 300])
    missing = await http.get("/v1/weights", headers=a._auth())
    assert missing.status == 404 and msgpack.unpackb(await missing.read())["error"] == "no_weights"
    for round_no, (va, vb) in enumerate([(1.0, 5.0), (2.0, -2.0)], start=1):
        answers = [await c.poll() for c in (a, b)]
        assert all(x.status == TRAIN and x.assignment.blocks == (0, 1, 2, 3) for x in answers)
        assert all(x.assignment.round == round_no for x in answers)
        for c, x, value in ((a, answers[0], va), (b, answers[1], vb)):
            assert await put_weights(c, x.assignment.round, save(block_weights(value))) == (204, None)
            ack = await c.report(x.assignment.round, fedavg_report(x.assignment))
            assert ack.status == 200, ack.body
        await a.poll(wait=0.1)
        resp = await http.get("/v1/weights", headers=a._auth())
        assert resp.status == 200 and resp.headers[VERSION_HEADER] == str(round_no)
        served = load(await resp.read())
        expected = (100 * va + 300 * vb) / 400  # registered sample counts weigh the clients
        assert set(served) == set(block_weights(0.0))
        for array in served.values():
            assert array.dtype == np.float32
            np.testing.assert_allclose(array, expected, rtol=1e-7)
    # Kept for per-round evaluation; the uploads themselves are gone after each close.
    weights_dir = Path(f"{start.db}.weights")
    assert version_path(weights_dir, 1).exists() and version_path(weights_dir, 2).exists()
    assert not list(weights_dir.glob("upload-*"))


async def test_without_keep_only_the_current_version_stays_on_disk(start: Any) -> None:
    http = await start(mode="fedavg", min_clients=1, min_reports=1)
    (a,) = await joined(http, [10])
    for _ in range(2):
        x = (await a.poll()).assignment
        assert (await put_weights(a, x.round, save(block_weights(1.0))))[0] == 204
        assert (await a.report(x.round, fedavg_report(x))).status == 200
    await a.poll(wait=0.1)
    files = sorted(p.name for p in Path(f"{start.db}.weights").iterdir())
    assert files == ["global-v000002.safetensors"]


async def test_fedavg_refuses_a_report_before_its_weights_and_bad_uploads(start: Any) -> None:
    http = await start(mode="fedavg", min_clients=1, min_reports=1)
    (a,) = await joined(http, [10])
    x = (await a.poll()).assignment
    early = await a.report(x.round, fedavg_report(x))
    assert (early.status, early.error) == (409, "weights_missing")
    short = block_weights(1.0)
    del short[tensor_key(3, "attn.weight")]
    status, body = await put_weights(a, x.round, save(short))
    assert (status, body["error"]) == (422, "invalid_weights") and "block 3 has 600" in body["message"]
    halves = {k: v.astype(np.float16) for k, v in block_weights(1.0).items()}
    status, body = await put_weights(a, x.round, save(halves))
    assert (status, body["error"]) == (422, "invalid_weights") and "F16" in body["message"]
    status, body = await put_weights(a, x.round, b"not safetensors at all")
    assert (status, body["error"]) == (422, "invalid_weights")
    status, body = await put_weights(a, x.round, save(block_weights(1.0)), ctype="application/msgpack")
    assert (status, body["error"]) == (415, "unsupported_media_type")
    with_steps = dataclasses.replace(fedavg_report(x), steps=((x.pool_indices[0], 0.1),))
    assert (await put_weights(a, x.round, save(block_weights(1.0))))[0] == 204
    wrong = await a.report(x.round, with_steps)
    assert (wrong.status, wrong.error) == (422, "wrong_steps")
    assert (await a.report(x.round, fedavg_report(x))).status == 200


async def test_a_zo_run_has_no_weight_endpoints(start: Any) -> None:
    http = await start(min_clients=1)
    (a,) = await joined(http, [10], budget=2**32)
    x = (await a.poll()).assignment
    resp = await http.get("/v1/weights", headers=a._auth())
    assert resp.status == 404 and msgpack.unpackb(await resp.read())["error"] == "not_fedavg"
    status, body = await put_weights(a, x.round, save(block_weights(1.0)))
    assert (status, body["error"]) == (404, "not_fedavg")
