"""The drift bound: distance of base + alpha from the base per block, from the table alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zorba_common.messages import AlphaDelta
from zorba_edge.client.trainer import advance_table
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.engine.directions import Direction
from zorba_server.aggregation import RoundDelta, apply_delta
from zorba_server.drift import KEEP_STEP, block_drift, bounded, describe
from zorba_server.drift_limits import Limited
from zorba_server.pool_indices import round_pool_indices


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
    assert set(scales) == {1} and KEEP_STEP <= scales[1].scale < 1 and scales[1].shrunk == 0
    assert out.pool_indices == change.pool_indices
    assert np.array_equal(out.values[:, 0], change.values[:, 0])
    after = block_drift(apply_delta(alpha, out), rms)
    assert after[1] == pytest.approx(0.05, rel=1e-5)
    assert after[0] < 0.05


def at_the_bound(rounds: int = 8, steps: int = 12, seed: int = 0) -> tuple[np.ndarray, RoundDelta]:
    """A one-block table filled round by round as a run fills it (each round `steps` rows
    drawn from the pool as the server draws them, random steps), rescaled to norm 1, and the
    next round's increments (as large as one of those rounds')."""
    rng = np.random.default_rng(seed)
    alpha = np.zeros((1024, 1))
    for r in range(1, rounds + 1):
        rows = sorted(set(round_pool_indices(seed, r, steps, 1024)))
        alpha[rows, 0] += rng.normal(0, 1, len(rows))
    alpha /= np.linalg.norm(alpha)
    rows = tuple(sorted(set(round_pool_indices(seed, rounds + 1, steps, 1024))))
    step = rng.normal(0, 1 / np.sqrt(rounds * steps), (len(rows), 1)).astype(np.float32)
    return alpha, RoundDelta(rows, (0,), step)


def test_a_block_at_the_bound_still_takes_its_share_of_the_round_and_stays_on_the_bound():
    alpha, change = at_the_bound()
    rows = list(change.pool_indices)
    # The older rule: a round's rows are fresh, so any step lengthens the column: it freezes.
    frozen, how = bounded(alpha, change, [1.0], max_drift=1.0, keep_step=0.0)
    assert how[0].scale < 0.05 and how[0].shrunk == 0
    out, how = bounded(alpha, change, [1.0], max_drift=1.0)
    assert how == {0: Limited(KEEP_STEP, how[0].shrunk)} and how[0].shrunk > 0
    after = apply_delta(alpha, out)
    # The round's rows moved by KEEP_STEP of the step, exactly as the old rule's scaling would.
    assert np.array_equal(out.values[:len(rows)], (change.values * KEEP_STEP).astype(np.float32))
    assert block_drift(after, [1.0])[0] == pytest.approx(1.0, abs=1e-6)
    # The room came from the largest older coefficients (one block: its own largest): each
    # shrunk row was at least as large as any row left untouched, all but the last now 0.
    shrunk = list(out.pool_indices[len(rows):])
    assert len(shrunk) == how[0].shrunk and not set(shrunk) & set(rows)
    left = np.setdiff1d(np.flatnonzero(alpha[:, 0]), np.array(shrunk + rows))
    assert np.abs(alpha[shrunk, 0]).min() >= np.abs(alpha[left, 0]).max()
    assert np.sum(np.abs(after[shrunk, 0]) > 1e-6 * np.abs(alpha[shrunk, 0])) <= 1


@pytest.mark.parametrize("seed", range(6))
def test_the_column_never_ends_past_the_bound(seed: int):
    rng = np.random.default_rng(seed)
    alpha, change = at_the_bound(rounds=int(rng.integers(1, 12)), seed=seed)
    alpha *= rng.uniform(0.5, 1.5)  # inside, on or past the bound
    change = RoundDelta(change.pool_indices, change.blocks,
                        (change.values * rng.uniform(0.1, 20)).astype(np.float32))
    out, how = bounded(alpha, change, [1.0], max_drift=1.0)
    after = block_drift(apply_delta(alpha, out), [1.0])[0]
    # Within float32 rounding of the increments; a block past the bound that the round
    # shortens anyway is left to it (the older rule's freedom), one the bound limited is on it.
    assert after <= max(1.0, block_drift(alpha, [1.0])[0]) * (1 + 1e-6)
    if how:
        assert after <= 1.0 + 1e-6


def test_a_step_past_the_bound_on_its_own_is_projected_and_the_older_rows_go_to_zero():
    alpha = np.zeros((8, 1))
    alpha[5, 0], alpha[6, 0] = 0.02, -0.01
    change = RoundDelta((0, 1), (0,), np.array([[0.3], [0.4]], dtype=np.float32))
    out, how = bounded(alpha, change, [1.0], max_drift=0.1)
    assert how == {0: Limited(KEEP_STEP, 2)}
    after = apply_delta(alpha, out)
    # The step's rows keep their direction, scaled onto the bound: (0.15, 0.2) -> (0.06, 0.08).
    assert after[[0, 1], 0] == pytest.approx([0.06, 0.08], rel=1e-6)
    assert after[[5, 6], 0] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert block_drift(after, [1.0])[0] == pytest.approx(0.1, rel=1e-6)


def test_the_published_delta_rebuilds_the_same_table_on_a_client():
    alpha, change = at_the_bound()
    alpha = np.hstack([alpha, alpha[::-1] * 0.5])  # block 1 inside its bound: left alone
    change = RoundDelta(change.pool_indices, (0, 1), np.hstack([change.values, change.values]))
    out, how = bounded(alpha, change, [1.0, 1.0], max_drift=1.0)
    assert set(how) == {0} and how[0].shrunk > 0
    assert np.array_equal(out.values[:len(change.pool_indices), 1], change.values[:, 1])
    server = apply_delta(alpha, out)
    client = CoefficientTable(1024, 2, alpha)
    advance_table(client, [AlphaDelta.from_matrix(1, 1, out.pool_indices, out.blocks, out.values)])
    assert np.array_equal(client.values, server)


def test_blocks_making_room_shrink_the_same_older_rows():
    """Each extra row costs every client a value per block: two blocks at the bound whose
    largest rows differ still add only as many rows as the one that needs most."""
    rng = np.random.default_rng(3)
    alpha = np.zeros((64, 2))
    alpha[:40] = rng.normal(0, 1, (40, 2))
    alpha /= np.linalg.norm(alpha, axis=0)
    change = RoundDelta((50, 51, 52), (0, 1), rng.normal(0, 0.3, (3, 2)).astype(np.float32))
    out, how = bounded(alpha, change, [1.0, 1.0], max_drift=1.0)
    assert how[0].shrunk > 0 and how[1].shrunk > 0
    assert len(out.pool_indices) - 3 == max(how[0].shrunk, how[1].shrunk)
    assert block_drift(apply_delta(alpha, out), [1.0, 1.0]) == pytest.approx([1.0, 1.0], abs=1e-6)


def test_a_block_already_past_the_bound_is_brought_back_to_it():
    alpha = np.zeros((4, 1))
    alpha[0, 0] = 0.1
    growing = RoundDelta((0,), (0,), np.array([[0.01]], dtype=np.float32))
    shrinking = RoundDelta((0,), (0,), np.array([[-0.01]], dtype=np.float32))
    # The older rule let such a block only shrink; now it takes its share and is projected.
    assert bounded(alpha, growing, [1.0], max_drift=0.05, keep_step=0.0)[1] == {0: Limited(0.0)}
    out, how = bounded(alpha, growing, [1.0], max_drift=0.05)
    assert how == {0: Limited(KEEP_STEP)}
    assert apply_delta(alpha, out)[0, 0] == pytest.approx(0.05, rel=1e-6)
    out, scales = bounded(alpha, shrinking, [1.0], max_drift=0.05)
    assert out is shrinking and scales == {}


def test_zero_turns_the_bound_off_and_bad_scales_are_refused():
    alpha = np.ones((2, 2))
    change = RoundDelta((0,), (0,), np.ones((1, 1), dtype=np.float32))
    assert bounded(alpha, change, [1.0, 1.0], max_drift=0.0) == (change, {})
    with pytest.raises(ValueError, match="one positive base RMS per block"):
        block_drift(alpha, [1.0])


def test_the_message_names_the_scaled_blocks_and_the_setting():
    text = describe({3: Limited(0.5, 4), 1: Limited(0.75)}, 0.05)
    assert "run.max_drift = 0.05" in text and "1 x0.75, 3 x0.50 (-4 older)" in text
    assert "shrinking its largest older coefficients" in text
    assert "older" not in describe({1: Limited(0.75)}, 0.05)
