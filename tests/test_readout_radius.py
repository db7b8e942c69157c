"""The label readout's own trust radius (run.readout_trust_radius, issue 26): checked, carried
on the wire only when it differs from its default, bounding the rows' step instead of the
body's radius, and cut with the step by the loss guard (zorba_server/step_size.py)."""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from engine_fakes import engine, join
from test_readout_client import assignment, readout_trainer
from test_round_engine import run_round

from zorba_common.codec import decode, encode
from zorba_common.limits import MAX_REPORT_BYTES
from zorba_common.messages import AlphaDelta, HyperParams
from zorba_common.readout import READOUT_TRUST_RADIUS, readout_block
from zorba_edge.client.trainer import ReadoutRound
from zorba_edge.engine.zo import weight_scale
from zorba_server.config import ConfigError, RunConfig
from zorba_server.rounds import APPLIED, REJECTED, RoundPlan
from zorba_server.step_size import LOSS_JUMP_BACKOFF, PLATEAU_DECAY, StepSize


def test_the_readout_radius_is_checked() -> None:
    assert RunConfig().readout_trust_radius == READOUT_TRUST_RADIUS
    RunConfig(readout_trust_radius=0.0)  # off: the readout's steps are not bounded
    for bad in (-0.01, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="readout_trust_radius"):
            RunConfig(readout_trust_radius=bad)


def test_the_wire_leaves_the_readout_radius_out_at_its_default() -> None:
    at_default = HyperParams(0.1, 1e-3, 8, 64, "one-sided", 4, 0.03, readout_directions=16)
    assert "readout_trust_radius" not in msgpack.unpackb(encode(at_default))
    cut = dataclasses.replace(at_default, readout_trust_radius=0.005)
    assert msgpack.unpackb(encode(cut))["readout_trust_radius"] == 0.005
    for message in (at_default, cut):
        assert decode(HyperParams, encode(message), max_bytes=MAX_REPORT_BYTES) == message


def test_a_stored_plan_from_before_the_readout_radius_keeps_the_bodys() -> None:
    """Its clients bounded the readout by the body's radius: a resumed round tells them so."""
    plan = RoundPlan(round=1, base_version=0, opened_at=0.0, deadline=1.0, pool_indices=(3,),
                     hyper=HyperParams(0.1, 1e-3, 8, 64, "one-sided", 4, 0.03, 16, 0.05, 0.002),
                     clients={})
    record = plan.to_record()
    assert RoundPlan.from_record(record).hyper == plan.hyper
    older = record | {"hyper": record["hyper"][:9]}
    assert RoundPlan.from_record(older).hyper.readout_trust_radius == 0.03


def test_the_readout_rows_move_by_the_readout_radius_not_the_bodys() -> None:
    """readout_lr far too large: the one batch's readout step is trust-bound, and its length is
    readout_trust_radius x the rows' RMS although the body's radius is 500 times larger."""
    trainer = readout_trainer()
    hyper = dataclasses.replace(trainer.run.hyper, readout_lr=1e3, trust_radius=0.5,
                                readout_trust_radius=1e-3)
    trainer.run = dataclasses.replace(trainer.run, hyper=hyper)
    trainer.hold((0, 2))
    assert trainer.readout is not None
    base = trainer.readout.rows.detach().clone()
    scale = weight_scale({0: trainer.readout.tensors()})
    task = dataclasses.replace(assignment((3, 9)), hyper=hyper)  # two directions: one batch
    round_ = ReadoutRound.of(trainer.readout, trainer.run, task)
    assert round_ is not None and round_.config.max_move == pytest.approx(1e-3 * scale)

    outcome = trainer.train_round(task, threading.Event())
    assert [k for k, _ in outcome.readout_steps] == [3, 9] and outcome.readout_shrunk_batches == 1
    # What the server adds (readout_lr x g per scalar) has the region's length exactly ...
    length = hyper.readout_lr * math.sqrt(sum(g * g for _, g in outcome.readout_steps))
    assert length == pytest.approx(1e-3 * scale, rel=1e-5)
    # ... and the rows that increment builds moved about that far (two near-orthogonal z).
    column = readout_block(trainer.run.num_blocks)
    values = np.array([[hyper.readout_lr * g] for _, g in outcome.readout_steps])
    trainer.apply_deltas([AlphaDelta.from_matrix(1, 1, (3, 9), (column,), values)])
    move = float(torch.sqrt(torch.mean((trainer.readout.rows.detach() - base) ** 2)))
    assert 0.5 * 1e-3 * scale < move < 1.5 * 1e-3 * scale


def test_the_step_size_cuts_the_readout_radius_with_lr() -> None:
    step = StepSize(1e-3, trust_radius=0.03, readout_lr=1e-2, readout_trust_radius=0.02, readout=True)
    cut = step.round_step((REJECTED, APPLIED), 1)
    factor = LOSS_JUMP_BACKOFF * PLATEAU_DECAY
    assert cut.lr == pytest.approx(1e-3 * factor) and cut.readout_lr == pytest.approx(1e-2 * factor)
    assert cut.readout_trust_radius == pytest.approx(0.02 * factor)
    assert cut.trust_radius == 0.03  # the body's radius stays as set
    assert "trust radius 0.005" in str(cut)
    off = dataclasses.replace(step, readout=False).round_step((REJECTED,), 0)
    assert (off.readout_lr, off.readout_trust_radius) == (1e-2, 0.02)  # sent at their settings
    assert str(off) == f"{off.lr:.3g}"


def test_a_rejected_round_halves_the_readout_radius_handed_out_next(tmp_path: Path) -> None:
    e = engine(tmp_path, lr=0.01, loss_jump_tolerance=0.5, readout_directions=4,
               readout_trust_radius=0.02)
    join(e, "a")
    assert run_round(e, 0.0, loss=0.70) == APPLIED
    first = e.propose_round(now=2.0)
    assert first is not None and first.hyper.readout_trust_radius == 0.02
    assert run_round(e, 2.0, loss=1.40) == REJECTED
    assert "trust radius 0.01" in e.history[-1].message
    hyper = e.propose_round(now=4.0).hyper  # type: ignore[union-attr]
    assert hyper.readout_trust_radius == pytest.approx(0.01) and hyper.lr == pytest.approx(0.005)
    assert hyper.trust_radius == first.hyper.trust_radius
