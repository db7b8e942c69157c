"""The server end to end, in process: rounds, aggregation, idempotency, refusals, restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from postgres_server import PostgresServer, postgres_server  # noqa: F401 (fixture)
from server_fakes import (
    SECRET,
    FakeClient,
    config_dict,
    db_fingerprint,
    make_report,
    post,
    profile,
)

from zorba_common.codec import encode
from zorba_common.limits import MAX_STEPS_PER_REPORT
from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import FINISHED, TRAIN, WAIT, RegisterRequest, Report, ReportAck
from zorba_server.app import SERVICES, create_app
from zorba_server.config import ConfigError, config_from_dict
from zorba_server.scheduler import solve_schedule

pytestmark = pytest.mark.asyncio


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the test's server stores its run: a SQLite file, or (parametrised indirectly with
    "postgres") a fresh database on the PostgreSQL server the tests start."""
    if getattr(request, "param", "sqlite") == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.new_database_url()
    return str(tmp_path / "server.sqlite3")


BOTH_STORES = pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def start(database: str, aiohttp_client: Any) -> Any:
    """start(**run_settings) -> (http client, app); one database per test."""
    db = database

    async def _start(solve: Any = solve_schedule, clock: Any = time.time,
                     **run: Any) -> tuple[Any, Any]:
        app = create_app(config_from_dict(config_dict(db, **run)), solve=solve, clock=clock)
        return await aiohttp_client(app), app

    _start.db = db  # type: ignore[attr-defined]
    return _start


async def joined(http: Any, n: int, samples: list[int] | None = None) -> list[FakeClient]:
    clients = []
    for i in range(n):
        c = FakeClient(http)
        answer = await c.register(profile(samples[i] if samples else 100, name=f"dev{i}"))
        assert answer.status == 201, answer.body
        clients.append(c)
    return clients


def reference_increment(assignments: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
                        grads: dict[str, list[float]], weights: dict[str, float], lr: float,
                        shape: tuple[int, int]) -> np.ndarray:
    """docs/design.md §2 written out with loops: lr * sum_n w_n sum_{t: k_t=k} g / sum_n w_n, per (k, b)."""
    out = np.zeros(shape)
    for b in range(shape[1]):
        holders = [cid for cid, (blocks, _) in assignments.items() if b in blocks]
        if not holders:
            continue
        total = sum(weights[cid] for cid in holders)
        for cid in holders:
            for k, g in zip(assignments[cid][1], grads[cid], strict=False):
                out[k, b] += lr * weights[cid] * g / total
    return out


async def test_a_round_applies_the_sample_weighted_mean_and_clients_sync_to_it(start: Any) -> None:
    http, _ = await start(min_clients=3, min_reports=3)
    clients = await joined(http, 3, samples=[100, 300, 600])
    answers = [await c.poll() for c in clients]
    assert all(a.status == TRAIN for a in answers)
    assert len({a.assignment.pool_indices for a in answers}) == 1  # one k list per round
    grads = {}
    for i, (c, a) in enumerate(zip(clients, answers, strict=True)):
        steps = len(a.assignment.pool_indices)
        grads[c.client_id] = [0.5 * (i + 1) - 0.1 * t for t in range(steps)]
        ack = await c.report(a.assignment.round, make_report(a.assignment, grads[c.client_id]))
        assert ack.status == 200, ack.body
    nxt = await clients[0].poll()
    assert nxt.version == 1 and len(nxt.deltas) == 1
    state = await clients[0].state()
    expected = reference_increment(
        {c.client_id: (a.assignment.blocks, a.assignment.pool_indices)
         for c, a in zip(clients, answers, strict=True)},
        grads, {c.client_id: w for c, w in zip(clients, [100, 300, 600], strict=True)},
        lr=0.01, shape=(64, 4))
    np.testing.assert_allclose(state.matrix(), expected, rtol=1e-6, atol=1e-12)
    assert np.abs(state.matrix()).sum() > 0
    # A client that applied the deltas holds exactly the server's table.
    np.testing.assert_array_equal(clients[0].alpha, state.matrix())


@BOTH_STORES
async def test_retry_with_the_same_key_returns_the_original_ack_and_counts_once(start: Any) -> None:
    http, _ = await start(min_clients=2, min_reports=2)
    a, b = await joined(http, 2)
    assignment = (await a.poll()).assignment
    report = make_report(assignment, key="k-1")
    first = await a.report(assignment.round, report)
    again = await a.report(assignment.round, report)
    assert first.status == again.status == 200
    assert first.body == again.body  # same received_at: the original answer
    before = db_fingerprint(start.db)
    assert before["reports"] == 1
    other = make_report(assignment, [9.0] * len(assignment.pool_indices), key="k-1")
    conflict = await a.report(assignment.round, other)
    assert (conflict.status, conflict.error) == (409, "idempotency_conflict")
    second = await a.report(assignment.round, make_report(assignment, key="k-2"))
    assert (second.status, second.error) == (409, "already_reported")
    assert db_fingerprint(start.db) == before
    # After the round closed, the retry still gets the original ack, and alpha moved once.
    await b.report(assignment.round, make_report((await b.poll()).assignment))
    await a.poll()
    assert a.version == 1
    late_retry = await a.report(assignment.round, report)
    assert (late_retry.status, late_retry.body) == (200, first.body)
    assert db_fingerprint(start.db)["version"] == 1


class FakeClock:
    """The server's clock, moved by the test: a deadline passes when the test says so, not
    when a busy machine gets round to it (with wall time, a report meant to be on time could
    arrive after a 1-s deadline)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def until_version(client: FakeClient, version: int) -> None:
    """Long-poll until the client hears of `version` (the driver closed the round)."""
    while (await client.poll(wait=5)).version < version:
        pass


async def test_a_late_report_is_refused_and_never_merged(start: Any) -> None:
    clock = FakeClock()
    http, _ = await start(min_clients=2, min_reports=1, round_duration_s=1.0, clock=clock)
    fast, slow = await joined(http, 2)
    a_fast, a_slow = (await fast.poll()).assignment, (await slow.poll()).assignment
    assert (await fast.report(1, make_report(a_fast))).status == 200
    clock.now += 1.2  # past the deadline
    late = await slow.report(1, make_report(a_slow, [5.0] * len(a_slow.pool_indices)))
    assert (late.status, late.error) == (409, "round_closed")
    assert "round 1 closed" in late.body["message"]
    await until_version(fast, 1)
    state = await fast.state()
    alone = reference_increment({"f": (a_fast.blocks, a_fast.pool_indices)},
                                {"f": [0.1 * (t + 1) for t in range(len(a_fast.pool_indices))]},
                                {"f": 100.0}, 0.01, (64, 4))
    np.testing.assert_allclose(state.matrix(), alone, rtol=1e-6)


async def test_too_few_reports_fail_the_round_which_is_re_run(start: Any) -> None:
    clock = FakeClock()
    http, _ = await start(min_clients=2, min_reports=2, round_duration_s=1.0, clock=clock)
    one, _two = await joined(http, 2)
    first = (await one.poll()).assignment
    assert (await one.report(first.round, make_report(first))).status == 200
    clock.now += 1.2  # past the deadline: the driver closes the round when it next looks
    rerun = await one.poll(wait=5)
    while rerun.status != TRAIN:  # the round closed and the next opened: the poll hears it
        rerun = await one.poll(wait=5)
    assert rerun.assignment.round == 2
    assert rerun.assignment.base_version == 0 and rerun.version == 0
    status = await (await http.get("/v1/status")).json()
    failed = status["rounds"][0]
    assert failed["status"] == "failed" and "re-run" in failed["message"]
    assert db_fingerprint(start.db)["increments"] == 0


async def test_long_poll_returns_as_soon_as_a_round_opens(start: Any) -> None:
    # A poll that timed out would answer WAIT: TRAIN shows it returned on the round's opening
    # (no wall-clock bound of our own, which a busy machine could overrun).
    http, _ = await start(min_clients=2, poll_timeout_s=120.0)
    first = FakeClient(http)
    await first.register()
    waiting = asyncio.ensure_future(first.poll(wait=120))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await FakeClient(http).register()
    answer = await waiting
    assert answer.status == TRAIN


async def test_a_client_behind_the_published_version_hears_of_it_at_once(start: Any) -> None:
    http, _ = await start(min_clients=1, max_steps=2)
    (a,) = await joined(http, 1)
    assignment = (await a.poll()).assignment
    assert (await a.report(assignment.round, make_report(assignment))).status == 200
    # Round 1 applied and round 2 opened for `a` alone; a newcomer at version 0 has no round,
    # but must learn of version 1 now, not when its 5-second poll times out.
    late = FakeClient(http)
    await late.register()
    started = asyncio.get_running_loop().time()
    answer = await late.poll(wait=5)
    assert answer.status == WAIT and answer.version == 1 and late.version == 1
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_poll_without_a_round_answers_wait_with_the_reason(start: Any) -> None:
    http, _ = await start(min_clients=3)
    (c,) = await joined(http, 1)
    answer = await c.poll(wait=0.1)
    assert answer.status == WAIT and "1 active, 3 needed" in answer.reason


async def test_schedule_is_solved_again_only_when_membership_changes(start: Any) -> None:
    calls: list[int] = []

    def counting(clients: Any, blocks: Any, config: Any, round_seed: int = 0) -> Any:
        calls.append(len(clients))
        return solve_schedule(clients, blocks, config)

    http, _ = await start(solve=counting, min_clients=2, min_reports=1)
    a, b = await joined(http, 2)
    for _ in range(2):
        for c in (a, b):
            assignment = (await c.poll()).assignment
            assert (await c.report(assignment.round, make_report(assignment))).status == 200
    assert calls == [2]  # round 3 is open now, still with two clients
    await joined(http, 1)
    for c in (a, b):
        assignment = (await c.poll()).assignment
        assert assignment.round == 3
        await c.report(assignment.round, make_report(assignment))
    assert (await a.poll()).assignment.round == 4
    assert calls == [2, 3]


async def test_a_far_behind_client_is_told_to_catch_up_from_state(start: Any) -> None:
    http, _ = await start(catch_up_rounds=1, min_reports=1)
    (c,) = await joined(http, 1)
    for _ in range(3):
        a = (await c.poll()).assignment
        await c.report(a.round, make_report(a))
    assert (await c.poll()).version == 3
    stale = FakeClient(http)
    stale.token, stale.version = c.token, 0
    resp = await http.get("/v1/rounds/next?version=0&wait=0",
                          headers={"Authorization": f"Bearer {c.token}"})
    body = msgpack.unpackb(await resp.read())
    assert body["catch_up"] is True and body["deltas"] == []
    synced = await stale.poll(wait=0)
    assert stale.version == synced.version == 3
    np.testing.assert_array_equal(stale.alpha, c.alpha)


async def test_the_run_finishes_after_max_rounds(start: Any) -> None:
    http, _ = await start(max_rounds=1)
    (c,) = await joined(http, 1)
    a = (await c.poll()).assignment
    await c.report(a.round, make_report(a))
    answer = await c.poll()
    assert answer.status == FINISHED and answer.version == 1


def _raw(http: Any, path: str, data: bytes, token: str | None, ctype: str) -> Any:
    headers = {"Content-Type": ctype}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http.post(path, data=data, headers=headers)


BAD_REPORTS: dict[str, tuple[Any, int, str]] = {
    # name: (mutation of the valid report dict or raw bytes, status, code)
    "not msgpack": (b"\xc1\x00garbage", 400, "invalid_message"),
    "not a map": (encode([1, 2, 3]), 400, "invalid_message"),
    "missing field": ({"drop": "steps"}, 400, "invalid_message"),
    "unknown field": ({"set": ("extra", 1)}, 400, "invalid_message"),
    "string for int": ({"set": ("num_samples", "8")}, 400, "invalid_message"),
    "bool for int": ({"set": ("peak_memory_bytes", True)}, 400, "invalid_message"),
    "negative count": ({"set": ("num_samples", -1)}, 400, "invalid_message"),
    "huge loss": ({"set": ("loss_mean", 1e308)}, 400, "invalid_message"),
    "infinite loss": ({"set": ("loss_last", float("inf"))}, 400, "invalid_message"),
    "huge peak": ({"set": ("peak_memory_bytes", 2**63 - 1)}, 400, "invalid_message"),
    "repeated key": ({"repeat": ("loss_mean", 5.0)}, 400, "invalid_message"),
    "nan scalar": ({"grad": float("nan")}, 422, "invalid_scalar"),
    "inf scalar": ({"grad": float("inf")}, 422, "invalid_scalar"),
    "out of range scalar": ({"grad": 1e9}, 422, "invalid_scalar"),
    "wrong pool index": ({"k": 999}, 422, "wrong_steps"),
    "too many steps": ({"extra_steps": 1}, 422, "wrong_steps"),
    "no steps": ({"set": ("steps", [])}, 422, "wrong_steps"),
    "stale base version": ({"set": ("base_version", 7)}, 409, "stale_version"),
    "oversized": ({"set": ("steps", [[0, 0.0]] * (MAX_STEPS_PER_REPORT + 1))}, 413, "too_large"),
    "huge body": (b"\x00" * (3 * 2**20), 413, "too_large"),
    "wrong content type": ({"ctype": "application/json"}, 415, "unsupported_media_type"),
    "no token": ({"token": None}, 401, "unauthorized"),
    "wrong token": ({"token": "not-a-token"}, 401, "unauthorized"),
    "unknown round": ({"round": 99}, 404, "unknown_round"),
    "past round": ({"round": 0}, 404, "unknown_round"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPORTS))
async def test_a_bad_report_is_refused_with_a_clear_error_and_changes_nothing(
        start: Any, case: str) -> None:
    http, app = await start(min_clients=2, min_reports=2)
    a, _b = await joined(http, 2)
    assignment = (await a.poll()).assignment
    valid = msgpack.unpackb(encode(make_report(assignment)))
    mutation, status, code = BAD_REPORTS[case]
    token, ctype, round_ = a.token, "application/msgpack", assignment.round
    if isinstance(mutation, bytes):
        data = mutation
    else:
        body = dict(valid)
        if "drop" in mutation:
            del body[mutation["drop"]]
        if "set" in mutation:
            body[mutation["set"][0]] = mutation["set"][1]
        if "grad" in mutation:
            body["steps"] = [[k, mutation["grad"]] for k, _ in body["steps"]]
        if "k" in mutation:
            body["steps"] = [[mutation["k"], g] for _, g in body["steps"]]
        if "extra_steps" in mutation:
            body["steps"] = body["steps"] + [[0, 0.1]]
        token = mutation.get("token", token)
        ctype = mutation.get("ctype", ctype)
        round_ = mutation.get("round", round_)
        data = msgpack.packb(body)
        if "repeat" in mutation:  # the key again, at the end: a plain decoder keeps the last
            key, value = mutation["repeat"]
            data = (bytes([0xDE]) + (len(body) + 1).to_bytes(2, "big") + data[1:]
                    + msgpack.packb(key) + msgpack.packb(value))
    before = db_fingerprint(start.db)
    resp = await _raw(http, f"/v1/rounds/{round_}/reports", data, token, ctype)
    body = msgpack.unpackb(await resp.read())
    assert (resp.status, body["error"]) == (status, code), body
    assert len(body["message"]) > 10
    assert db_fingerprint(start.db) == before
    coordinator = app[SERVICES].coordinator
    assert not coordinator.engine.open.received and not coordinator.pending
    # The client can still send its real report afterwards.
    good = await a.report(assignment.round, make_report(assignment))
    assert good.status == 200


async def test_registration_refusals_name_the_problem_and_register_nobody(start: Any) -> None:
    http, _ = await start()
    c = FakeClient(http)
    assert (await c.register()).status == 201  # pins the run's model
    assert (await c.poll()).assignment is not None  # the first round is open: nothing else moves
    before = db_fingerprint(start.db)
    other_shape = ModelFootprint((10, 10), (8, 8), 50, 8, 10, 2, 16)
    cases = [
        (dict(secret="wrong-secret"), 403, "forbidden"),
        (dict(prof=profile(fingerprint="another-model")), 409, "model_mismatch"),
        (dict(prof=profile(footprint=other_shape)), 409, "model_mismatch"),
        (dict(prof=profile(budget=1000)), 422, "budget_too_small"),
    ]
    for kwargs, status, code in cases:
        answer = await FakeClient(http).register(**kwargs)
        assert (answer.status, answer.error) == (status, code), answer.body
    old = await post(http, "/v1/clients", RegisterRequest(SECRET, profile(), protocol=2), ReportAck)
    assert (old.status, old.error) == (400, "protocol_version")
    assert db_fingerprint(start.db) == before


async def test_unknown_routes_and_methods_answer_msgpack_errors(start: Any) -> None:
    http, _ = await start()
    for method, path, status in (("GET", "/v1/nothing", 404), ("PUT", "/v1/clients", 405),
                                 ("POST", "/v1/rounds/x/reports", 404)):
        resp = await http.request(method, path)
        assert resp.status == status
        assert msgpack.unpackb(await resp.read())["error"] in ("not_found", "method_not_allowed")
    resp = await http.get("/v1/rounds/next?version=abc", headers={"Authorization": "Bearer x"})
    assert resp.status == 401  # authentication comes first
    (c,) = await joined(http, 1)
    auth = {"Authorization": f"Bearer {c.token}"}
    resp = await http.get("/v1/rounds/next?version=-1", headers=auth)
    assert (resp.status, msgpack.unpackb(await resp.read())["error"]) == (400, "bad_query")
    resp = await http.get("/v1/rounds/next?version=5", headers=auth)
    assert (resp.status, msgpack.unpackb(await resp.read())["error"]) == (409, "version_ahead")


async def test_measured_peaks_calibrate_the_memory_model(start: Any) -> None:
    http, app = await start()
    (c,) = await joined(http, 1)
    a = (await c.poll()).assignment
    coordinator = app[SERVICES].coordinator
    member = coordinator.engine.members[c.client_id]
    predicted = coordinator.engine.memory_model(member.profile, 1.0).total(a.blocks)
    await c.report(a.round, make_report(a, peak=2 * predicted))
    a = (await c.poll()).assignment
    assert member.calibration == pytest.approx(2.0)  # an under-estimate is corrected at once
    predicted = coordinator.engine.memory_model(member.profile, 1.0).total(a.blocks)
    await c.report(a.round, make_report(a, peak=predicted))
    await c.poll()
    assert member.calibration == pytest.approx(1.5)  # an over-estimate only decays (EMA 0.5)


async def test_status_page_metrics_and_status_json_show_the_run(start: Any) -> None:
    http, _ = await start()
    (c,) = await joined(http, 1)
    for loss in (2.0, 1.5):
        a = (await c.poll()).assignment
        await c.report(a.round, make_report(a, loss=loss))
    await c.poll()
    status = await (await http.get("/v1/status")).json()
    assert [r["loss"] for r in status["rounds"]] == [2.0, 1.5]
    assert status["version"] == 2 and status["clients"][0]["rounds_reported"] == 2
    # The run's hyper-parameters, as the clients were told them (config_dict's lr 0.01).
    hyper = status["hyper"]
    assert (hyper["lr"], hyper["batch_size"], hyper["seq_len"]) == (0.01, 8, 64)
    assert hyper["lr_factor"] == 1.0 and hyper["estimator"] == "one-sided"
    # The slow loss rule is on; the drift bound is not (the server holds no base weights).
    assert hyper["loss_drift_rounds"] == 3 and hyper["max_drift"] == 0.0
    assert status["block_drift"] is None
    page = await (await http.get("/")).text()
    assert "<polyline" in page and c.client_id in page and "batch_size 8" in page
    metrics = await (await http.get("/metrics")).text()
    assert 'zorba_rounds_total{status="applied"} 2' in metrics
    assert "zorba_reports_accepted_total 2" in metrics


@BOTH_STORES
async def test_a_restarted_server_resumes_the_open_round_with_its_reports(
        database: str, aiohttp_client: Any) -> None:
    db = database
    config = config_from_dict(config_dict(db, min_clients=2, min_reports=2))
    http = await aiohttp_client(create_app(config))
    a, b = await joined(http, 2)
    asg_a, asg_b = (await a.poll()).assignment, (await b.poll()).assignment
    report_a = make_report(asg_a, key="a-1")
    first = await a.report(1, report_a)
    await http.close()  # graceful stop; test_server_durability kills with SIGKILL

    http = await aiohttp_client(create_app(config))
    a.http = b.http = http
    status = await (await http.get("/v1/status")).json()
    assert status["current_round"]["round"] == 1 and status["current_round"]["reported"] == 1
    assert (await a.report(1, report_a)).body == first.body
    assert (await b.report(1, make_report(asg_b))).status == 200
    await a.poll()
    assert a.version == 1


@BOTH_STORES
async def test_a_restart_changes_no_counter_or_client_record_a_person_sees(
        database: str, aiohttp_client: Any) -> None:
    db = database
    config = config_from_dict(config_dict(db, min_clients=1))
    http = await aiohttp_client(create_app(config))
    (a,) = await joined(http, 1)
    for loss, peak in ((0.9, 1 << 20), (0.7, 3 << 20)):
        assignment = (await a.poll()).assignment
        assert (await a.report(assignment.round, make_report(assignment, loss=loss, peak=peak))).status == 200
    await a.poll()  # round 2 closed, round 3 open
    before = await (await http.get("/v1/status")).json()
    await http.close()

    http = await aiohttp_client(create_app(config))
    after = await (await http.get("/v1/status")).json()
    (client,) = after["clients"]
    assert client["rounds_reported"] == 2 and client["last_loss"] == 0.7
    assert client["last_peak_bytes"] == 3 << 20 and client["peak_over_budget"] > 0
    assert after["counters"]["reports_accepted"] == before["counters"]["reports_accepted"] == 2
    assert {k: before["clients"][0][k] for k in ("rounds_reported", "last_loss", "last_peak_bytes")} \
        == {k: client[k] for k in ("rounds_reported", "last_loss", "last_peak_bytes")}


async def test_no_round_opens_that_could_only_fail_for_lack_of_reports(start: Any) -> None:
    http, _ = await start(min_clients=1, min_reports=2)
    (c,) = await joined(http, 1)
    answer = await c.poll(wait=0.2)
    assert answer.status == WAIT and "fewer than min_reports=2" in answer.reason
    await joined(http, 1)
    assert (await c.poll(wait=3)).status == TRAIN


async def test_a_model_pinned_by_the_config_refuses_the_first_client_of_another(
        start: Any) -> None:
    pinned = {"block_params": [10, 10], "quantizable_block_params": [8, 8],
              "embed_head_params": 50, "hidden_size": 8, "vocab_size": 10, "num_layers": 2,
              "intermediate_size": 16}
    http, _ = await start(model_fingerprint="the-run-model", footprint=pinned)
    answer = await FakeClient(http).register()
    assert (answer.status, answer.error) == (409, "model_mismatch")
    assert "the-run-model" in answer.body["message"]
    assert db_fingerprint(start.db)["clients"] == 0


async def test_restarting_on_a_database_of_another_run_is_refused(
        tmp_path: Path, aiohttp_client: Any) -> None:
    db = tmp_path / "s.sqlite3"
    http = await aiohttp_client(create_app(config_from_dict(config_dict(db, seed=1))))
    await http.close()
    with pytest.raises(ConfigError, match="seed=1"):
        await aiohttp_client(create_app(config_from_dict(config_dict(db, seed=2))))


async def test_the_full_assignment_mode_gives_every_client_every_block(start: Any) -> None:
    http, _ = await start(solve=None, mode="fedzo-full", min_clients=2)
    clients = await joined(http, 2)
    for c in clients:
        assert (await c.poll()).assignment.blocks == (0, 1, 2, 3)


async def test_an_unknown_run_mode_is_refused_clearly(start: Any) -> None:
    with pytest.raises(ConfigError,
                       match="run.mode='random': use one of zorba, zorba-uniform, fedzo-full, fedavg"):
        await start(solve=None, mode="random")


@pytest.mark.parametrize("path_round", [
    "18446744073709551616",   # 2**64: overflowed the report's hash (a 500)
    "9223372036854775808",    # 2**63: beyond SQLite's integers
    "9007199254740992",       # MAX_COUNTER + 1
    "9" * 5000,               # int() refuses this many digits (a 500)
    "%D9%A1",                 # ARABIC-INDIC DIGIT ONE: \d matches it, int() reads 1
    "0",
])
async def test_a_report_to_a_round_number_out_of_range_is_refused_and_changes_nothing(
        start: Any, path_round: str) -> None:
    http, _ = await start(min_clients=2, min_reports=2)
    a, _b = await joined(http, 2)
    assignment = (await a.poll()).assignment
    before = db_fingerprint(start.db)
    for method, suffix, data, ctype in (
            ("POST", "reports", encode(make_report(assignment)), "application/msgpack"),
            ("PUT", "weights", b"", "application/vnd.zorba.safetensors")):
        resp = await http.request(method, f"/v1/rounds/{path_round}/{suffix}", data=data,
                                  headers={"Authorization": f"Bearer {a.token}",
                                           "Content-Type": ctype})
        body = msgpack.unpackb(await resp.read())
        assert (resp.status, body["error"]) == (404, "unknown_round"), body
        assert "rounds are numbered 1 to" in body["message"]
    assert db_fingerprint(start.db) == before
    assert (await a.report(assignment.round, make_report(assignment))).status == 200


@pytest.mark.parametrize("query", ["version=18446744073709551616", "version=%D9%A1",
                                   "version=1_0", "version=" + "9" * 5000, "wait=nan",
                                   "wait=-1"])
async def test_a_poll_with_an_out_of_range_query_is_a_bad_query(start: Any, query: str) -> None:
    http, _ = await start()
    (c,) = await joined(http, 1)
    resp = await http.get(f"/v1/rounds/next?{query}", headers={"Authorization": f"Bearer {c.token}"})
    assert (resp.status, msgpack.unpackb(await resp.read())["error"]) == (400, "bad_query")


def _strict_json(text: str) -> Any:
    """json.loads that refuses the non-JSON constants Python's json module would accept."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


async def test_status_json_is_valid_json_even_with_non_finite_values(start: Any) -> None:
    http, app = await start()
    (c,) = await joined(http, 1)
    a = (await c.poll()).assignment
    await c.report(a.round, make_report(a))
    await c.poll()
    # A value that is not finite (however it got there) must not break the document.
    coordinator = app[SERVICES].coordinator
    coordinator.engine.members[c.client_id].last_loss = float("inf")
    coordinator.engine.members[c.client_id].calibration = float("nan")
    resp = await http.get("/v1/status")
    assert resp.content_type == "application/json"
    status = _strict_json(await resp.text())
    client = status["clients"][0]
    assert client["last_loss"] is None and client["calibration"] is None


@pytest.mark.parametrize("footprint", [
    ModelFootprint((), (), 50, 8, 10, 0, 16),                     # no blocks (was a 500)
    ModelFootprint((10, 10), (8, 11), 50, 8, 10, 2, 16),          # quantizable > block
    ModelFootprint((10, -10), (8, 0), 50, 8, 10, 2, 16),          # negative block
    ModelFootprint((10, 10), (8, 8), 50, 0, 10, 2, 16),           # zero hidden size
    ModelFootprint((10, 10), (8, 8), 50, 8, 0, 2, 16),            # zero vocabulary
])
async def test_a_first_client_cannot_pin_a_meaningless_footprint(
        start: Any, footprint: ModelFootprint) -> None:
    http, _ = await start()
    body = msgpack.unpackb(encode(RegisterRequest(SECRET, profile())))
    body["profile"]["footprint"] = msgpack.unpackb(msgpack.packb(footprint, default=vars))
    resp = await _raw(http, "/v1/clients", msgpack.packb(body), None, "application/msgpack")
    error = msgpack.unpackb(await resp.read())
    assert (resp.status, error["error"]) == (400, "invalid_message"), error
    assert "footprint" in error["message"]
    assert db_fingerprint(start.db)["clients"] == 0
    # Nothing was pinned: a client with a real model still joins and trains.
    (c,) = await joined(http, 1)
    assert (await c.poll()).status == TRAIN


async def _leave(http: Any, client: FakeClient) -> int:
    resp = await http.post("/v1/leave", headers={"Authorization": f"Bearer {client.token}"})
    return resp.status


@BOTH_STORES
async def test_a_client_that_leaves_is_out_of_the_next_round_at_once_and_after_a_restart(
        database: str, aiohttp_client: Any) -> None:
    # A long membership timeout and deadline: without the leave, round 2 would assign c and
    # then wait 60 s for its report.
    config = config_from_dict(config_dict(database, min_clients=2, min_reports=2,
                                          round_duration_s=60.0, member_timeout_s=600.0))
    http = await aiohttp_client(create_app(config))
    a, b, c = await joined(http, 3)
    # The first round may open with the first two to register; play rounds until one
    # assigns all three.
    reported = 0
    while True:
        answers = {x.client_id: await x.poll(wait=1) for x in (a, b, c)}
        first = {cid: ans.assignment for cid, ans in answers.items() if ans.status == TRAIN}
        if len(first) == 3:
            break
        for x in (a, b, c):
            if x.client_id in first:
                await x.report(first[x.client_id].round, make_report(first[x.client_id]))
                reported += 1
    r = first[c.client_id].round
    assert (await c.report(r, make_report(first[c.client_id]))).status == 200
    assert await _leave(http, c) == 204
    for x in (a, b):
        assert (await x.report(r, make_report(first[x.client_id]))).status == 200
    # Round r closes with all three reports (c's work counts); r + 1 opens with a and b.
    second = [(await x.poll(wait=3)).assignment for x in (a, b)]
    assert [s.round for s in second] == [r + 1, r + 1]
    status = await (await http.get("/v1/status")).json()
    assert status["rounds"][-1]["round"] == r and status["rounds"][-1]["reports"] == 3
    assert status["current_round"]["assigned"] == 2
    assert {cl["client_id"]: (cl["active"], cl["left"]) for cl in status["clients"]} == {
        a.client_id: (True, False), b.client_id: (True, False), c.client_id: (False, True)}
    for x, asg in zip((a, b), second, strict=True):
        assert (await x.report(r + 1, make_report(asg))).status == 200
    assert (await a.poll(wait=3)).assignment.round == r + 2  # no 60 s wait for c
    await http.close()

    http = await aiohttp_client(create_app(config))  # the leave is durable
    for x in (a, b, c):
        x.http = http
    status = await (await http.get("/v1/status")).json()
    assert {cl["client_id"]: cl["active"] for cl in status["clients"]} == {
        a.client_id: True, b.client_id: True, c.client_id: False}
    assert status["counters"]["reports_accepted"] == reported + 5
    # Coming back (its token still holds) makes it active again, durably too.
    await c.poll(wait=0)
    status = await (await http.get("/v1/status")).json()
    assert [cl["active"] for cl in status["clients"] if cl["client_id"] == c.client_id] == [True]


async def test_leave_needs_the_clients_token(start: Any) -> None:
    http, _ = await start()
    resp = await http.post("/v1/leave")
    assert (resp.status, msgpack.unpackb(await resp.read())["error"]) == (401, "unauthorized")


async def test_status_page_and_metrics_show_each_clients_bytes_per_round_and_peak(
        start: Any) -> None:
    http, _ = await start()
    (c,) = await joined(http, 1)
    status = await (await http.get("/v1/status")).json()
    assert status["clients"][0]["last_round_bytes_up"] is None  # no round reported yet
    reports = []
    for loss in (2.0, 1.5):
        a = (await c.poll()).assignment
        reports.append(make_report(a, loss=loss, peak=3 << 20))
        assert (await c.report(a.round, reports[-1])).status == 200
    client = (await (await http.get("/v1/status")).json())["clients"][0]
    # Up: the polls carry no body, so the round's bytes up are exactly its report's.
    assert client["last_round_bytes_up"] == len(encode(reports[-1]))
    # Down: at least the assignment poll's answer and the ack.
    assert client["last_round_bytes_down"] > len(encode(ReportAck(2, "k" * 32, 0.0)))
    page = await (await http.get("/")).text()
    assert "last round KiB up / down" in page and "peak / budget" in page
    metrics = await (await http.get("/metrics")).text()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.splitlines() if line.startswith("zorba_client_")}
    cid = c.client_id
    assert samples[f'zorba_client_round_bytes{{client="{cid}",direction="up"}}'] == \
        len(encode(reports[-1]))
    assert samples[f'zorba_client_round_bytes{{client="{cid}",direction="down"}}'] == \
        client["last_round_bytes_down"]
    assert samples[f'zorba_client_last_peak_bytes{{client="{cid}"}}'] == 3 << 20
    assert samples[f'zorba_client_budget_bytes{{client="{cid}"}}'] == 2**32


def _client_samples(metrics: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines() if line.startswith("zorba_client_")}


@BOTH_STORES
async def test_each_clients_bytes_per_round_are_the_same_after_a_restart(
        database: str, aiohttp_client: Any) -> None:
    """Before they were stored, a restart reset them: the status page showed no bytes."""
    config = config_from_dict(config_dict(database))
    http = await aiohttp_client(create_app(config))
    a, b = await joined(http, 2)
    last: dict[str, tuple[int, Report]] = {}
    for _ in range(2):
        for c in (a, b):
            asg = (await c.poll()).assignment
            last[c.client_id] = (asg.round, make_report(asg))
            assert (await c.report(*last[c.client_id])).status == 200
    shown_before_retry = (await (await http.get("/v1/status")).json())["clients"]
    # A retry of a stored report gets its ack again but ends no round of its own (it used to
    # replace the round's figures by its own two bodies: a restart would then change them).
    assert (await a.report(*last[a.client_id])).status == 200
    before = (await (await http.get("/v1/status")).json())["clients"]
    samples = _client_samples(await (await http.get("/metrics")).text())
    await http.close()

    http = await aiohttp_client(create_app(config))  # a new server over the same database
    after = (await (await http.get("/v1/status")).json())["clients"]
    fields = ("client_id", "last_round_bytes_up", "last_round_bytes_down")
    shown = [{f: c[f] for f in fields} for c in before]
    assert shown == [{f: c[f] for f in fields} for c in shown_before_retry]
    assert shown == [{f: c[f] for f in fields} for c in after]
    assert all(c["last_round_bytes_up"] and c["last_round_bytes_down"] for c in shown)
    restarted = _client_samples(await (await http.get("/metrics")).text())
    wire = {k: v for k, v in samples.items() if k.startswith("zorba_client_round_bytes")}
    assert len(wire) == 4 and wire == {k: v for k, v in restarted.items() if k in wire}
    for c in shown:
        assert wire[f'zorba_client_round_bytes{{client="{c["client_id"]}",direction="up"}}'] == \
            c["last_round_bytes_up"]


@BOTH_STORES
async def test_the_loss_guard_rolls_back_through_the_real_server_and_the_run_goes_on(
        start: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A rejected round with a rollback is stored, published and synced like any version (the
    stored status was refused by schema 1 and the round driver failed on every retry)."""
    caplog.set_level(logging.INFO, logger="zorba_server")
    http, _ = await start(min_clients=1, min_reports=1, loss_jump_tolerance=0.5)
    (c,) = await joined(http, 1)

    async def round_with(check: float) -> None:
        a = (await c.poll()).assignment
        report = dataclasses.replace(make_report(a), loss_check=check)
        assert (await c.report(a.round, report)).status == 200

    await round_with(1.0)  # version 0 is the anchor
    await round_with(1.1)  # +10%: applied, version 2
    await round_with(2.0)  # +100% over version 0: rejected, rolled back to it
    nxt = await c.poll()
    assert nxt.status == TRAIN and nxt.version == 3  # the rollback is version 3
    status = await (await http.get("/v1/status")).json()
    assert [r["status"] for r in status["rounds"][:3]] == ["applied", "applied", "rejected"]
    assert "rolled back to version 0" in status["rounds"][2]["message"]
    state = await c.state()
    np.testing.assert_allclose(state.matrix(), 0.0, atol=1e-6)  # version 0's table again
    np.testing.assert_allclose(c.alpha, state.matrix(), atol=0)  # and the client synced to it
    assert nxt.assignment.hyper.lr == pytest.approx(0.005)  # the step halved
    # A server run at --log-level WARNING (as the quickstart's is) still says it backed off.
    closes = [(r.levelno, r.getMessage()) for r in caplog.records if " applied: " in r.getMessage()
              or " rejected: " in r.getMessage()]
    assert [level for level, _ in closes] == [logging.INFO, logging.INFO, logging.WARNING]
    assert "rolled back to version 0" in closes[2][1]


async def test_a_waiting_client_hears_of_a_new_version_even_when_the_next_round_fails_to_open(
        start: Any) -> None:
    """The close is stored and published; opening the next round then fails (its store write
    raises): a client long-polling for a new version learns of it now, not at its timeout."""
    http, app = await start(min_clients=1, max_steps=2, poll_timeout_s=120.0)
    (a,) = await joined(http, 1)
    assignment = (await a.poll()).assignment
    late = FakeClient(http)
    await late.register()  # joins the next round: round 1 has nothing for it
    waiting = asyncio.ensure_future(late.poll(wait=120))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    store = app[SERVICES].coordinator._store
    insert_round = store.insert_round

    async def failing_once(plan: Any) -> None:
        store.insert_round = insert_round  # the driver's retry succeeds
        raise OSError("disk full (injected)")

    store.insert_round = failing_once
    started = asyncio.get_running_loop().time()
    assert (await a.report(assignment.round, make_report(assignment))).status == 200
    answer = await waiting
    assert answer.version == 1 and late.version == 1
    # Far before its 120-s timeout (the margin is for a busy machine, not a measurement).
    assert asyncio.get_running_loop().time() - started < 60.0
