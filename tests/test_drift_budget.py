"""The drift budget: the clients' fluency curvature -> the largest move of any block (server)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from engine_fakes import close_round, engine, join, open_next, received
from server_fakes import config_dict, profile

from zorba_common.codec import SchemaError, decode, encode
from zorba_common.messages import DeviceProfile
from zorba_server.config import config_from_dict
from zorba_server.drift import block_drift
from zorba_server.drift_budget import agreed, describe, max_move, round_bounds
from zorba_server.drift_limits import Limited
from zorba_server.rounds import APPLIED
from zorba_server.status_view import run_status

GEMMA = 1.7e4
"""About what the probe measured on Gemma 3 270M (docs/learning.md, "The drift budget")."""


def test_the_run_takes_the_median_and_marks_the_values_that_stand_apart():
    assert agreed([]).curvature is None
    assert agreed([("a", 100.0)]).curvature == 100.0
    three = agreed([("a", 100.0), ("liar", 1e-6), ("b", 104.0)])
    assert three.curvature == 100.0 and three.ignored == ("liar",)
    # An even count takes the larger middle value: the tighter bound.
    assert agreed([("a", 100.0), ("b", 120.0)]).curvature == 120.0
    # A lone huge value among honest ones moves nothing.
    many = agreed([("a", 100.0), ("b", 101.0), ("c", 99.0), ("huge", 1e12)])
    assert many.curvature == 101.0 and many.ignored == ("huge",)
    # A model whose loss did not rise (0) agrees only with another such value.
    assert agreed([("a", 0.0), ("b", 0.0), ("c", 5.0)]).ignored == ("c",)


def test_the_bound_is_the_move_that_spends_the_budgeted_share_of_the_tolerance():
    s = max_move(GEMMA, fluency_tolerance=0.2, budget=0.5)
    assert s == pytest.approx(math.sqrt(0.1 / GEMMA))
    assert GEMMA * s ** 2 == pytest.approx(0.5 * 0.2)  # the predicted rise at the bound
    # Nothing measured, nothing that rises, the budget or the watch off: no bound.
    assert max_move(None, 0.2, 0.5) == 0.0
    assert max_move(0.0, 0.2, 0.5) == 0.0
    assert max_move(GEMMA, 0.2, 0.0) == 0.0
    assert max_move(GEMMA, 0.0, 0.5) == 0.0


def test_a_round_past_the_budget_is_scaled_so_every_trained_block_lands_on_it(tmp_path: Path):
    e = engine(tmp_path)  # lr 0.01, scalars ~1: a round moves a block far past 1e-2 per parameter
    join(e, "a", fluency_curvature=GEMMA)
    bound = e.max_move()
    assert bound == pytest.approx(math.sqrt(0.5 * 0.2 / GEMMA))
    for round_ in (1, 2):
        closure = close_round(e, float(round_), "a")
        assert closure.outcome.status == APPLIED
        assert "the drift budget (a move of at most" in closure.outcome.message
        assert e.alpha is not None
        move = block_drift(e.alpha, (1.0,) * e.alpha.shape[1])
        trained = sorted(closure.plan.clients["a"].blocks)
        assert np.allclose(move[trained], bound, rtol=1e-5), move
        assert move.max() <= bound * (1 + 1e-5)
    status = run_status(e, "run", {}, now=3.0)
    assert status["hyper"]["max_move"] == pytest.approx(bound)
    assert status["hyper"]["fluency_curvature"] == GEMMA
    assert status["block_move"] == pytest.approx(list(move), rel=1e-5)
    assert [c["fluency_curvature"] for c in status["clients"]] == [GEMMA]


def test_a_block_at_the_budget_keeps_moving_along_each_rounds_steps(tmp_path: Path):
    """The older rule froze a block at its bound (a round's rows are fresh, so every step
    lengthens the column); now each round moves the round's rows by half its step and the
    largest older coefficients make room."""
    e = engine(tmp_path)
    join(e, "a", fluency_curvature=GEMMA)
    bound = e.max_move()
    close_round(e, 1.0, "a")  # lands every trained block on the bound
    for round_ in (2, 3):
        assert e.alpha is not None
        before = e.alpha.copy()
        closure = close_round(e, float(round_), "a")
        assert closure.outcome.status == APPLIED and closure.delta is not None
        assert "older)" in closure.outcome.message, closure.outcome.message
        trained = sorted(closure.plan.clients["a"].blocks)
        rows = sorted(set(closure.plan.pool_indices[closure.plan.clients["a"].steps()]))
        moved = np.abs(e.alpha - before)[np.ix_(rows, trained)]
        assert (moved.max(axis=0) > 0.1 * np.abs(before[:, trained]).max(axis=0)).all()
        move = block_drift(e.alpha, (1.0,) * e.alpha.shape[1])
        assert np.allclose(move[trained], bound, rtol=1e-5), move


def test_a_run_of_set_length_spends_the_budget_evenly_over_its_rounds():
    assert round_bounds([0.0, 0.5, 1.0, 2.0], 1.0, 0) == (1.0, 1.0, 1.0, 1.0)
    # Each round adds an even share of what is left of the squared budget.
    assert round_bounds([0.0, 0.5, 1.0, 2.0], 1.0, 4) == pytest.approx(
        (0.5, math.sqrt(0.25 + 0.75 / 4), 1.0, 1.0))
    assert round_bounds([0.3], 1.0, 1) == (1.0,)


def test_with_max_rounds_each_round_takes_its_share_and_the_last_reaches_the_bound(tmp_path: Path):
    e = engine(tmp_path, max_rounds=4)
    join(e, "a", fluency_curvature=GEMMA)
    bound = e.max_move()
    for round_, expected in enumerate((bound / 2, bound / math.sqrt(2), bound * math.sqrt(0.75), bound), 1):
        closure = close_round(e, float(round_), "a")
        assert closure.outcome.status == APPLIED
        assert e.alpha is not None
        move = block_drift(e.alpha, (1.0,) * e.alpha.shape[1])
        trained = sorted(closure.plan.clients["a"].blocks)
        assert np.allclose(move[trained], expected, rtol=1e-5), (round_, move)
        if round_ < 4:
            assert f"{5 - round_} round(s) left" in closure.outcome.message


def test_older_clients_or_a_budget_of_zero_leave_the_round_as_it_was(tmp_path: Path):
    """Clients without the field (older ones): no curvature, no bound: today's behaviour."""
    moved = []
    for name, run, curvature in (("older", {}, None), ("off", {"drift_budget": 0.0}, GEMMA)):
        e = engine(tmp_path, **run)
        join(e, "a", fluency_curvature=curvature)
        assert e.max_move() == 0.0
        open_next(e)
        e.accept_report(received(e, "a"))
        closure = e.decide_close(now=1.0)
        e.apply_close(closure)
        assert "drift budget" not in closure.outcome.message, name
        assert e.alpha is not None
        moved.append(block_drift(e.alpha, (1.0,) * e.alpha.shape[1]).max())
    assert min(moved) > 5 * math.sqrt(0.1 / GEMMA)  # unbounded: ~6x the budget's bound


def test_members_choose_the_median_and_a_member_without_the_field_changes_nothing(tmp_path: Path):
    e = engine(tmp_path)
    join(e, "a", fluency_curvature=100.0)
    join(e, "older")
    join(e, "liar", fluency_curvature=1e9)
    join(e, "b", fluency_curvature=101.0)
    assert e.fluency_curvature == 101.0 and e.curvature_ignored == ("liar",)
    status = run_status(e, "run", {}, now=0.0)
    assert [c["curvature_ignored"] for c in status["clients"]] == [False, False, True, False]


def test_the_field_is_left_out_of_the_wire_while_nil_and_round_trips_when_set():
    plain = profile()
    assert b"fluency_curvature" not in encode(plain)
    measured = profile(fluency_curvature=GEMMA)
    assert b"fluency_curvature" in encode(measured)
    assert decode(DeviceProfile, encode(measured), max_bytes=1 << 20) == measured
    with pytest.raises(SchemaError, match="fluency_curvature"):
        decode(DeviceProfile, encode(profile(fluency_curvature=-1.0)), max_bytes=1 << 20)


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan])
def test_the_setting_must_be_a_finite_share_at_or_above_zero(tmp_path: Path, value: float):
    with pytest.raises(Exception, match="run.drift_budget must be a finite number >= 0"):
        config_from_dict(config_dict(tmp_path / "db.sqlite3", drift_budget=value))


def test_the_message_names_the_scaled_blocks_and_the_bound():
    text = describe({3: Limited(0.5, 2), 1: Limited(0.75)}, 2.4e-3)
    assert "at most 0.0024 per parameter" in text and "1 x0.75, 3 x0.50 (-2 older)" in text
