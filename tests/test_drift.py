"""The drift bound: distance of base + alpha from the base per block, from the table alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zorba_edge.engine.directions import Direction
from zorba_server.aggregation import RoundDelta, apply_delta
from zorba_server.drift import block_drift, bounded, describe


def materialised_drift(alpha: np.ndarray, block: int, params: int, seed: int) -> float:
    """|sum_k alpha[k,b] z[k,b]| computed element by element with the run's own directions."""
    moved = [("weight", torch.zeros(params, dtype=torch.float64))]
    for k in np.flatnonzero(alpha[:, block]):
        Direction({block: moved}, seed, int(k)).add_(float(alpha[k, block]))
    return float(moved[0][1].norm())


def test_the_drift_from_the_table_equals_the_materialised_distance_within_its_stated_error():
    params, rng = 20_000, np.random.default_rng(0)
    alpha = np.zeros((64, 2))
    alpha[:40, 0] = rng.normal(0, 1e-3, 40)
    alpha[10:50, 1] = rng.normal(0, 3e-3, 40)
    rms = [0.2, 0.05]
    drift = block_drift(alpha, rms)
    for b in range(2):
        exact = materialised_drift(alpha, b, params, seed=5) / (rms[b] * np.sqrt(params))
        # The cross terms' relative size is ~sqrt(2 / P) = 1%: four of those is a loose check.
        assert drift[b] == pytest.approx(exact, rel=4 * np.sqrt(2 / params))


def test_a_round_within_the_bound_is_left_as_it_is():
    alpha = np.zeros((8, 3))
    change = RoundDelta((1, 2), (0, 2), np.full((2, 2), 1e-3, dtype=np.float32))
    out, scales = bounded(alpha, change, [1.0, 1.0, 1.0], max_drift=0.05)
    assert out is change and scales == {}


def test_a_round_past_the_bound_is_scaled_on_that_block_only_to_land_on_the_bound():
    alpha = np.zeros((8, 3))
    alpha[0, 1] = 0.03
    change = RoundDelta((1, 2), (0, 1), np.array([[1e-3, 0.04], [1e-3, 0.03]], dtype=np.float32))
    rms = [1.0, 1.0, 0.5]
    out, scales = bounded(alpha, change, rms, max_drift=0.05)
    assert set(scales) == {1} and 0 < scales[1] < 1
    assert np.array_equal(out.values[:, 0], change.values[:, 0])
    after = block_drift(apply_delta(alpha, out), rms)
    assert after[1] == pytest.approx(0.05, rel=1e-5)
    assert after[0] < 0.05


def test_a_block_already_past_the_bound_may_shrink_but_not_grow():
    alpha = np.zeros((4, 1))
    alpha[0, 0] = 0.1
    growing = RoundDelta((0,), (0,), np.array([[0.01]], dtype=np.float32))
    shrinking = RoundDelta((0,), (0,), np.array([[-0.01]], dtype=np.float32))
    assert bounded(alpha, growing, [1.0], max_drift=0.05)[1] == {0: 0.0}
    out, scales = bounded(alpha, shrinking, [1.0], max_drift=0.05)
    assert out is shrinking and scales == {}


def test_zero_turns_the_bound_off_and_bad_scales_are_refused():
    alpha = np.ones((2, 2))
    change = RoundDelta((0,), (0,), np.ones((1, 1), dtype=np.float32))
    assert bounded(alpha, change, [1.0, 1.0], max_drift=0.0) == (change, {})
    with pytest.raises(ValueError, match="one positive base RMS per block"):
        block_drift(alpha, [1.0])


def test_the_message_names_the_scaled_blocks_and_the_setting():
    text = describe({3: 0.5, 1: 0.25}, 0.05)
    assert "run.max_drift = 0.05" in text and "1 x0.25, 3 x0.50" in text
