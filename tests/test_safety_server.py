"""The drift bound and the fluency watch on the real server: the clients' base RMS and
generic-text losses reach the round engine, which bounds and rolls back as the simulator does;
older peers, which neither send nor know the new fields, keep working."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from engine_fakes import close_round, engine, join, open_next, received
from server_fakes import BIG, FOOTPRINT, FakeClient, config_dict, make_report, profile
from test_trainer import HYPER, assignment, make_trainer

from zorba_common.codec import SchemaError, decode, encode
from zorba_common.messages import Assignment, DeviceProfile, Report
from zorba_edge.engine.fluency import generic_batch
from zorba_edge.model.base_rms import BlockRMS, read_base_rms, tensors_rms
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_server.app import create_app
from zorba_server.base_rms import agreed
from zorba_server.config import config_from_dict
from zorba_server.drift import block_drift
from zorba_server.rounds import APPLIED, REJECTED
from zorba_server.status_view import run_status

RMS = (0.001, 0.001, 0.001, 0.001)
"""Small enough that config_dict's lr 0.01 and the fakes' scalars carry a block past 5%."""


# ------------------------------------------------------------------ the base RMS


def test_the_rms_most_clients_agree_on_is_used_and_one_that_stands_apart_is_ignored() -> None:
    honest, other = (1.0, 2.0), (1.0, 20.0)
    # The first value stands while nobody contradicts it ...
    assert agreed([("a", honest)]).rms == honest
    # ... a client that disagrees with it is ignored, and so is a liar that came first once
    # two honest clients outvote it.
    assert agreed([("a", honest), ("b", other)]).ignored == ("b",)
    found = agreed([("liar", other), ("a", honest), ("b", (1.0, 2.0 * 1.001))])
    assert found.rms == honest and found.source == "a" and found.ignored == ("liar",)
    assert agreed([]).rms is None


def test_the_engine_takes_the_drift_bounds_reference_from_the_clients_profiles(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "old")  # an older client sends none: the bound stays off
    assert e.base_rms is None
    join(e, "a", base_rms=RMS)
    join(e, "liar", base_rms=(1.0, 1.0, 1.0, 1.0))
    join(e, "b", base_rms=RMS)
    assert e.base_rms == RMS and e.base_rms_ignored == ("liar",)
    status = run_status(e, "run", {}, now=0.0)
    assert status["block_base_rms"] == list(RMS)
    assert [c["base_rms_ignored"] for c in status["clients"]] == [False, False, True, False]


def test_a_round_that_drifts_past_the_bound_is_scaled_onto_it_as_in_the_simulator(tmp_path: Path) -> None:
    e = engine(tmp_path, max_drift=0.05)
    join(e, "a", base_rms=RMS)
    for round_ in (1, 2):
        closure = close_round(e, float(round_), "a")
        assert closure.outcome.status == APPLIED
        assert "the drift bound (run.max_drift = 0.05" in closure.outcome.message
        assert e.alpha is not None
        drift = block_drift(e.alpha, RMS)
        # Every trained block lands on the bound (float32 increments: to 1e-6), none past it.
        trained = sorted(closure.plan.clients["a"].blocks)
        assert np.allclose(drift[trained], 0.05, rtol=1e-5), drift
    # Without the clients' RMS the same round moves the block ~100 times further.
    e = engine(tmp_path, max_drift=0.05)
    join(e, "a")
    open_next(e)
    e.accept_report(received(e, "a"))
    e.apply_close(e.decide_close(now=1.0))
    assert e.alpha is not None and block_drift(e.alpha, RMS).max() > 1.0


# ------------------------------------------------------------------ the fluency watch


def _round(e: Any, generic: dict[str, float | None], now: float) -> Any:
    open_next(e, now=now)
    for cid, loss in generic.items():
        e.accept_report(received(e, cid, loss_generic=loss))
    closure = e.decide_close(now=now)
    e.apply_close(closure)
    return closure


def test_a_report_whose_generic_loss_broke_rolls_the_round_back_to_the_last_fluent_version(
        tmp_path: Path) -> None:
    e = engine(tmp_path, loss_jump_tolerance=0.0, loss_drift_rounds=0)  # the watch alone
    for cid in ("a", "b", "c"):
        join(e, cid, base_rms=RMS)
    join(e, "old")
    first = _round(e, {"a": 3.0, "b": 3.2, "c": 2.9, "old": None}, now=1.0)
    # Asked: the clients that sent their base RMS (an older one never hears of the field).
    assert {cid: first.plan.assignment_for(cid, 0.0).measure_generic for cid in first.plan.clients} \
        == {"a": True, "b": True, "c": True, "old": False}
    assert first.outcome.status == APPLIED and e.version == 1
    # Version 1 within 20% of each client's base: fluent. A minority past it rolls nothing back.
    second = _round(e, {"a": 3.5, "b": 3.3, "c": 4.0, "old": None}, now=2.0)
    assert second.outcome.status == APPLIED and e.version == 2
    assert e.fluent is not None and e.fluent.version == 1
    fluent_alpha = e.fluent.alpha.copy()
    lr = e.hyper().lr
    # Version 2 past it for a majority: not applied, back to version 1's table, step halved.
    third = _round(e, {"a": 3.7, "b": 3.9, "c": 3.0, "old": None}, now=3.0)
    assert third.outcome.status == REJECTED
    assert "the fluency watch: generation broke" in third.outcome.message
    assert "rolled back to version 1's" in third.outcome.message
    assert e.version == 3 and e.alpha is not None
    assert np.allclose(e.alpha, fluent_alpha, rtol=0, atol=1e-8)  # the way back travels as float32
    assert e.hyper().lr == pytest.approx(lr / 2)
    fluency = run_status(e, "run", {}, now=4.0)["fluency"]
    assert fluency["broken"] and fluency["version"] == 2 and fluency["fluent_version"] == 1
    assert (fluency["breaking"], fluency["judged"]) == (2, 3)


def test_a_broken_model_before_any_fluent_verdict_goes_back_to_the_base(tmp_path: Path) -> None:
    e = engine(tmp_path, loss_jump_tolerance=0.0, loss_drift_rounds=0)
    join(e, "a", base_rms=RMS)
    _round(e, {"a": None}, now=1.0)  # measured nothing (a client that was not asked, say)
    # Its first value then is its reference: version 1 is fluent by that measure ...
    assert _round(e, {"a": 3.0}, now=2.0).outcome.status == APPLIED
    # ... and a value 50% above it breaks version 2: back to version 1's table.
    closure = _round(e, {"a": 4.5}, now=3.0)
    assert closure.outcome.status == REJECTED and "version 1's" in closure.outcome.message
    e = engine(tmp_path, loss_jump_tolerance=0.0, loss_drift_rounds=0)
    join(e, "a", base_rms=RMS)
    join(e, "b", base_rms=RMS)
    _round(e, {"a": 3.0, "b": None}, now=1.0)
    e.fluent = None  # as after a restart: no fluent version known
    # b joins the judging late: its reference is the others' base value (3.0), not its own first.
    closure = _round(e, {"a": 4.0, "b": 4.0}, now=2.0)
    assert closure.outcome.status == REJECTED and "version 0's" in closure.outcome.message
    assert e.alpha is not None and not e.alpha.any()


def test_the_watch_is_off_at_tolerance_0_and_judges_nobody_without_generic_losses(tmp_path: Path) -> None:
    e = engine(tmp_path, fluency_tolerance=0.0, loss_jump_tolerance=0.0, loss_drift_rounds=0)
    join(e, "a", base_rms=RMS)
    first = _round(e, {"a": 3.0}, now=1.0)
    assert not first.plan.assignment_for("a", 0.0).measure_generic
    assert _round(e, {"a": 30.0}, now=2.0).outcome.status == APPLIED
    e = engine(tmp_path, loss_jump_tolerance=0.0, loss_drift_rounds=0)
    join(e, "old")
    for now in (1.0, 2.0):
        assert _round(e, {"old": None}, now=now).outcome.status == APPLIED
    assert e.last_fluency is None and run_status(e, "run", {}, now=3.0)["fluency"] is None


# ------------------------------------------------------------------ older peers


def test_old_messages_without_the_fields_still_work() -> None:
    old_profile = profile()
    # A profile, an assignment and a report at their defaults carry no new key: an older peer's
    # strict decoder reads them as before ...
    assert "base_rms" not in msgpack.unpackb(encode(old_profile))
    plain = Assignment(1, 0, (0,), (3,), HYPER, 10.0, 0.0)
    assert "measure_generic" not in msgpack.unpackb(encode(plain))
    report = make_report(plain)
    assert "loss_generic" not in msgpack.unpackb(encode(report))
    # ... and what an older peer sends (no such keys) decodes with the fields at their defaults.
    assert decode(DeviceProfile, encode(old_profile), max_bytes=BIG).base_rms is None
    assert decode(Report, encode(report), max_bytes=BIG).loss_generic is None
    # Used, they travel and come back.
    sent = dataclasses.replace(old_profile, base_rms=RMS)
    assert decode(DeviceProfile, encode(sent), max_bytes=BIG).base_rms == RMS
    asked = dataclasses.replace(plain, measure_generic=True)
    assert decode(Assignment, encode(asked), max_bytes=BIG).measure_generic
    measured = dataclasses.replace(report, loss_generic=3.25)
    assert decode(Report, encode(measured), max_bytes=BIG).loss_generic == 3.25
    # One value per block, each positive.
    with pytest.raises(SchemaError, match="base_rms: 2 values for a model of 4 blocks"):
        dataclasses.replace(old_profile, base_rms=(1.0, 1.0))
    bad = msgpack.unpackb(encode(sent))
    bad["base_rms"] = [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(SchemaError, match=r"base_rms\[1\]"):
        decode(DeviceProfile, msgpack.packb(bad), max_bytes=BIG)


@pytest.mark.asyncio
async def test_the_real_server_bounds_drift_and_rolls_back_a_broken_round_saying_so(
        tmp_path: Path, aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    config = config_dict(tmp_path / "server.sqlite3", max_drift=0.05, loss_jump_tolerance=0.0,
                         loss_drift_rounds=0, min_clients=3, min_reports=3)
    http = await aiohttp_client(create_app(config_from_dict(config), clock=time.time))
    caplog.set_level(logging.INFO, logger="zorba_server")
    clients = [FakeClient(http) for _ in range(3)]
    sent = (RMS, (1.0, 1.0, 1.0, 1.0), None)  # honest, standing apart, an older client
    for client, rms in zip(clients, sent, strict=True):
        assert (await client.register(profile(name="dev", base_rms=rms))).status == 201
    assert "sent base-weight RMS values that stand apart" in caplog.text
    for generic in (3.0, 4.0):  # version 0, then version 1 past 20% above it
        answers = [await c.poll() for c in clients]
        for client, answer in zip(clients, answers, strict=True):
            a = answer.assignment
            asked = client is not clients[2]
            assert a is not None and a.measure_generic == asked
            report = make_report(a, loss_generic=generic if asked else None)
            assert (await client.report(a.round, report)).status == 200
    await clients[0].poll()
    status = await (await http.get("/v1/status")).json()
    assert status["hyper"]["max_drift"] == 0.05 and status["block_base_rms"] == list(RMS)
    assert [c["base_rms_ignored"] for c in status["clients"]] == [False, True, False]
    first, second = status["rounds"][:2]
    assert first["status"] == "applied" and "the drift bound" in first["message"]
    assert max(status["block_drift"]) <= 0.05 * (1 + 1e-5)
    assert second["status"] == "rejected" and "the fluency watch: generation broke" in second["message"]
    assert status["fluency"]["broken"] and status["fluency"]["fluent_version"] == 0
    assert not np.any(clients[0].alpha)  # back at the base: version 0 was the last fluent one
    assert any("generation broke" in r.getMessage() for r in caplog.records if r.name == "zorba_server")


# ------------------------------------------------------------------ the client's side


def test_a_client_measures_the_generic_loss_only_when_asked_a_batch_of_rows_a_forward() -> None:
    trainer = make_trainer()
    plain = assignment(1, (0, 2), (3, 9))
    quiet = trainer.train_round(plain, threading.Event())
    asked = trainer.train_round(dataclasses.replace(plain, measure_generic=True), threading.Event())
    assert quiet.loss_generic is None and asked.loss_generic is not None
    # The text's rows, at most a batch's a forward (the memory model counts one batch).
    rows = len(generic_batch(trainer.task.tokenizer, plain.hyper.seq_len))
    assert asked.loss_generic > 0
    assert asked.forwards == quiet.forwards + -(-rows // plain.hyper.batch_size)
    # Measured on the model as received: the round's own steps do not change it.
    again = trainer.train_round(dataclasses.replace(plain, measure_generic=True), threading.Event())
    assert again.loss_generic == asked.loss_generic
    assert asked.report(plain, "k").loss_generic == asked.loss_generic


def test_the_base_rms_a_client_sends_is_the_simulators_read_off_the_probes_load() -> None:
    trainer = make_trainer()
    source = trainer.source
    rms = BlockRMS()
    loaded = load_model(source, (0, 1, 2), LoadConfig(frozen_dtype="fp32"),
                        materialize=rms.reading(source.block_state_dict))
    values = rms.values(3)
    assert values is not None and values == read_base_rms(source)
    # What a direction perturbs, as the simulator measures it on the held fp32 blocks.
    held = tuple(tensors_rms(t for _, t in loaded.trainable_parameters(b)) for b in range(3))
    assert np.allclose(values, held, rtol=1e-12)
    assert BlockRMS().values(3) is None
    assert FOOTPRINT.num_blocks == 4  # the fakes' model, which RMS above is shaped for
