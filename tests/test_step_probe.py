"""The step from a start-up probe of the task loss: the client's probe, the server's rule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from engine_fakes import engine
from server_fakes import profile
from torch import nn

from zorba_common.codec import decode, encode
from zorba_common.messages import DeviceProfile, TaskProbe
from zorba_edge.engine.directions import Direction
from zorba_edge.engine.step_probe import probe
from zorba_server.config import config_from_dict
from zorba_server.members import Member
from zorba_server.status_view import run_status
from zorba_server.step_rule import STEP_SAFETY, best_lr, probed_lr


class Quadratic(nn.Module):
    """L_batch(w) = 0.5 sum_i h_i (w_i - c)^2 + batch . (w - c), w starting at c: gradient
    `batch`, Hessian diag(h)."""

    def __init__(self, h: torch.Tensor, c: float = 0.5) -> None:
        super().__init__()
        self.h, self.c = h, c
        self.w = nn.Parameter(torch.full_like(h, c))


def quadratic_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    assert isinstance(model, Quadratic)
    x = model.w - model.c
    return 0.5 * (model.h * x ** 2).sum() + (batch * x).sum()


def test_on_a_quadratic_the_probe_measures_the_trace_the_gradients_and_their_common_part():
    d = 256
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(d, generator=gen) * 2.0
    common = torch.randn(d, generator=gen)
    a, b = common + torch.randn(d, generator=gen), common + torch.randn(d, generator=gen)
    model = Quadratic(h)
    blocks = {0: [("w", model.w)]}
    directions = 400
    result = probe(model, blocks, quadratic_loss, (a, b), 8, directions=directions, move=0.05, seed=3)
    m = result.measured
    # z^T H z = tr(H) exactly for a Rademacher z and a diagonal H; the second difference of a
    # quadratic is exact up to fp32 rounding.
    assert m.curvature == pytest.approx(float(h.sum()), rel=1e-3)
    # The same directions, regenerated: g_A = z . a exactly (a central difference of a quadratic).
    zs = []
    for k in range(directions):
        w = torch.zeros(d)
        Direction({0: [("w", w)]}, 3, k).add_(1.0)
        zs.append(w)
    z = torch.stack(zs)
    ga, gb = z @ a, z @ b
    assert m.e_g2 == pytest.approx(float(((ga ** 2 + gb ** 2) / 2).mean()), rel=1e-3)
    assert m.signal == pytest.approx(float((ga * gb).mean()), rel=1e-3, abs=1e-3)
    # ... whose expectations are (|a|^2 + |b|^2) / 2 and a . b, the common part's |grad|^2.
    assert m.e_g2 == pytest.approx(float((a @ a + b @ b) / 2), rel=0.15)
    assert m.signal == pytest.approx(float(a @ b), rel=0.3)
    assert result.forwards == 2 * (1 + 2 * directions) and m.batch_size == 8
    assert m.weight_rms == pytest.approx(0.5)  # what the trust region is relative to
    assert float((model.w.detach() - 0.5).abs().max()) < 1e-6  # back where it started, up to rounding


def test_the_probe_moves_by_the_default_fraction_of_the_weights_rms():
    model = Quadratic(torch.ones(64), c=2.0)
    result = probe(model, {0: [("w", model.w)]}, quadratic_loss, (torch.ones(64), torch.ones(64)), 4,
                   directions=1)
    assert result.move == pytest.approx(0.03 * 2.0)
    assert result.measured.curvature == pytest.approx(64.0, rel=1e-3)


def test_the_rule_is_half_the_one_step_bounds_best_lr_at_the_runs_batch_size():
    sent = TaskProbe(e_g2=100.0, signal=40.0, curvature=200.0, batch_size=8, weight_rms=0.2)
    # lr* = S / (E[g^2] C) with E[g^2] at the probe's own batch size, whatever the directions.
    assert best_lr(sent, 4, 8, 0.03) == pytest.approx(STEP_SAFETY * 40.0 / (100.0 * 200.0))
    assert best_lr(sent, 1, 8, 0.03) == best_lr(sent, 4, 8, 0.03)
    # Twice the batch: the noise part (60) halves, the signal stays.
    assert best_lr(sent, 4, 16, 0.03) == pytest.approx(STEP_SAFETY * 40.0 / ((40.0 + 30.0) * 200.0))
    # No usable signal: nothing to say.
    for bad in (dataclasses.replace(sent, signal=-1.0), dataclasses.replace(sent, e_g2=0.0)):
        assert best_lr(bad, 4, 8, 0.03) is None


def test_a_loss_that_does_not_curve_up_gets_the_trust_regions_step():
    flat = TaskProbe(e_g2=100.0, signal=40.0, curvature=-50.0, batch_size=8, weight_rms=0.2)
    lr = best_lr(flat, 4, 8, 0.03)
    # A typical batch's step, lr sqrt(n E[g^2]) per parameter, reaches 0.03 x the weights' RMS.
    assert lr is not None and lr * math.sqrt(4 * 100.0) == pytest.approx(0.03 * 0.2)
    assert best_lr(dataclasses.replace(flat, curvature=0.0), 4, 8, 0.03) == lr
    assert best_lr(flat, 4, 8, 0.0) is None  # no region to bound it: the run keeps run.lr


def test_the_run_takes_the_smaller_middle_value_of_the_usable_ones():
    def sent(signal: float) -> TaskProbe:
        return TaskProbe(e_g2=100.0, signal=signal, curvature=100.0, batch_size=8, weight_rms=0.2)

    one = best_lr(sent(10.0), 4, 8, 0.03)
    assert one is not None
    step = probed_lr([("a", sent(10.0)), ("b", sent(20.0)), ("noise", sent(-5.0)), ("c", sent(40.0))],
                     4, 8, 0.03)
    assert step.lr == pytest.approx(2 * one) and step.used == ("a", "b", "c")
    assert probed_lr([("a", sent(10.0)), ("b", sent(20.0))], 4, 8, 0.03).lr == pytest.approx(one)
    assert probed_lr([("noise", sent(-5.0))], 4, 8, 0.03).lr is None
    assert probed_lr([], 4, 8, 0.03).lr is None
    # In run.lr's unit: a client of every block gets `all_blocks_scale` x run.lr.
    assert probed_lr([("a", sent(10.0))], 4, 8, 0.03, all_blocks_scale=0.25).lr == pytest.approx(4 * one)


def _join(e, name: str, task_probe: TaskProbe | None) -> None:  # type: ignore[no-untyped-def]
    p = dataclasses.replace(profile(name=name), task_probe=task_probe)
    e.check_registration(p)
    e.add_member(Member(name, p, 0.0, 1.0, 0.0, p.step_time_s))


PROBED = TaskProbe(e_g2=100.0, signal=50.0, curvature=1e4, batch_size=8, weight_rms=0.2)


def test_a_probe_run_takes_the_probes_lr_and_one_without_probes_keeps_the_constant(tmp_path: Path):
    probed = engine(tmp_path, step_rule="probe", batch_size=8, directions=4, trust_radius=0.03)
    _join(probed, "a", PROBED)
    expected = best_lr(PROBED, 4, 8, 0.03)
    assert expected is not None and probed.hyper().lr == pytest.approx(expected)
    status = run_status(probed, "run", {}, now=0.0)["hyper"]
    assert status["probed_lr"] == pytest.approx(expected) and status["step_rule"] == "probe"
    # Older clients send no probe: the run keeps run.lr.
    older = engine(tmp_path, step_rule="probe")
    _join(older, "old", None)
    assert older.hyper().lr == 0.01 and run_status(older, "run", {}, now=0.0)["hyper"]["probed_lr"] is None
    # The constant rule ignores probes.
    constant = engine(tmp_path)
    _join(constant, "a", PROBED)
    assert constant.hyper().lr == 0.01


def test_the_probes_lr_is_cut_by_the_loss_guard_as_run_lr_is(tmp_path: Path):
    e = engine(tmp_path, step_rule="probe", batch_size=8, directions=4)
    _join(e, "a", PROBED)
    assert e.step_size.round_step(("rejected",), 0).lr == pytest.approx(0.5 * e.hyper().lr)


def test_the_probe_is_left_out_of_the_wire_while_nil_and_round_trips_when_set():
    plain = profile()
    assert b"task_probe" not in encode(plain)
    measured = dataclasses.replace(plain, task_probe=PROBED)
    assert b"task_probe" in encode(measured)
    assert decode(DeviceProfile, encode(measured), max_bytes=1 << 20) == measured


def test_the_probe_rule_refuses_the_normalised_estimator(tmp_path: Path):
    from server_fakes import config_dict
    with pytest.raises(Exception, match="run.step_rule = probe"):
        config_from_dict(config_dict(tmp_path / "x.sqlite3", step_rule="probe", estimator="normalised"))
    with pytest.raises(Exception, match="run.step_rule="):
        config_from_dict(config_dict(tmp_path / "x.sqlite3", step_rule="guess"))
