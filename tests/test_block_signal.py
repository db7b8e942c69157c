"""Per-block signal share from pairs of clients' scalars (zorba_server/block_signal.py)."""

from __future__ import annotations

import numpy as np
import pytest

from zorba_server.block_signal import MAX_PAIRS, BlockSignal


def _round(rng: np.random.Generator, energy: np.ndarray, rho: np.ndarray,
           assignments: list[list[int]], steps: int) -> list[tuple[list[int], list[tuple[int, float]]]]:
    """Every client measures the same `steps` pool indices: per index and block, a shared part
    (the direction against the true gradient, variance G_b = rho_b s_b) and each client's own
    minibatch noise (variance s_b - G_b)."""
    signal = energy * rho
    shared = rng.normal(0.0, np.sqrt(signal), size=(steps, energy.size))
    reports = []
    for blocks in assignments:
        own = rng.normal(0.0, np.sqrt(energy - signal), size=(steps, energy.size))
        g = (shared + own)[:, blocks].sum(axis=1)
        reports.append((blocks, [(k, float(g[k])) for k in range(steps)]))
    return reports


def test_known_signal_shares_are_recovered_and_ranked() -> None:
    rng = np.random.default_rng(0)
    energy, rho = np.array([1.0, 2.0, 4.0, 1.0]), np.array([0.1, 0.3, 0.6, 0.9])
    tracker = BlockSignal(4)
    assignments = [[0], [1], [2], [3], [0, 1], [2, 3], [0, 2], [1, 3]]
    for r in range(1, 41):
        tracker.observe(r, _round(rng, energy, rho, assignments, 32))
    est = tracker.estimate(energy)
    assert est.rho == pytest.approx(rho, abs=0.12)
    assert np.argsort(est.rho).tolist() == [0, 1, 2, 3]
    assert (est.sd < 0.15).all() and (np.abs(est.rho - rho) < 3 * est.sd).all()
    assert 0.2 < est.prior < 0.8  # the pooled share lies among the blocks'


def test_few_pairs_shrink_toward_the_fleets_mean() -> None:
    rng = np.random.default_rng(1)
    energy, rho = np.array([1.0, 1.0, 1.0]), np.array([0.05, 0.5, 0.95])
    tracker = BlockSignal(3)
    tracker.observe(1, _round(rng, energy, rho, [[0, 1, 2], [0, 1, 2]], 4))
    est = tracker.estimate(energy)
    # one pair over all blocks tells them nothing apart: each keeps the pooled share
    assert est.rho == pytest.approx(np.full(3, est.prior), abs=1e-6)
    assert (est.sd > 0.2).all()


def test_nothing_shared_books_nothing_and_the_estimate_is_uninformed() -> None:
    tracker = BlockSignal(2)
    tracker.observe(1, [([0], [(0, 1.0), (1, -1.0)]), ([1], [(0, 2.0)])])  # no common block
    tracker.observe(2, [([0], [(0, 1.0)]), ([0], [(5, 2.0)])])  # no common index
    tracker.observe(3, [([0], [(0, 1.0)])])  # no pair
    assert not tracker.rows
    est = tracker.estimate([1.0, 1.0])
    assert est.rho.tolist() == [0.0, 0.0] and est.rows == 0


def test_a_pair_measures_the_product_of_its_scalars_on_common_indices() -> None:
    tracker = BlockSignal(3)
    tracker.observe(4, [([0, 1], [(7, 2.0), (8, 1.0)]), ([1, 2], [(7, 3.0), (9, 5.0)])])
    (row,) = tracker.rows
    assert row.blocks == (1,) and row.products == 1 and row.mean_product == 6.0
    assert row.noise == pytest.approx(2.5 * 17.0)


def test_a_round_books_at_most_max_pairs() -> None:
    tracker = BlockSignal(1)
    tracker.observe(1, [([0], [(0, 1.0 + i)]) for i in range(40)])  # 780 pairs
    assert len(tracker.rows) == MAX_PAIRS


def test_a_large_fleets_booked_pairs_spread_over_every_client() -> None:
    """With more clients than MAX_PAIRS pairs can cover, the pairs booked are neighbours first
    (clients n and n + 1), not all the pairs of the first client (whose noise would then be
    in every row)."""
    clients = 80
    # client n reports (n + 1) at pool index 0: a pair's product names its two clients
    reports = [([0], [(0, float(n + 1))]) for n in range(clients)]
    tracker = BlockSignal(1)
    tracker.observe(1, reports)
    assert len(tracker.rows) == MAX_PAIRS < clients - 1
    products = sorted(row.mean_product for row in tracker.rows)
    assert products == sorted(float((n + 1) * (n + 2)) for n in range(MAX_PAIRS))
