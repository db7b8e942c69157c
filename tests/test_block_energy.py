"""Per-block gradient energy from the reported scalars (zorba_server/block_energy.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from engine_fakes import engine, join, open_next, received

from zorba_server.block_energy import MAX_ROWS, BlockEnergy
from zorba_server.status_page import render
from zorba_server.status_view import run_status
from zorba_server.step_size import MAX_ENERGY_SCALE, StepSize


def _scalars(rng: np.random.Generator, energy: np.ndarray, blocks: list[int], n: int) -> list[float]:
    # g = sum over the held blocks of independent parts with variance s_b each
    return [float(sum(rng.normal(0.0, np.sqrt(energy[b])) for b in blocks)) for _ in range(n)]


def test_varied_assignments_recover_each_blocks_energy() -> None:
    rng = np.random.default_rng(0)
    true = np.array([0.2, 1.0, 4.0, 18.0])
    tracker = BlockEnergy([100, 100, 100, 100])
    assignments = [[0], [1], [2], [3], [0, 1], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    for r in range(1, 13):
        for blocks in assignments:
            tracker.observe(r, blocks, _scalars(rng, true, blocks, 48))
    est = tracker.estimate()
    assert est == pytest.approx(true, rel=0.35)
    assert np.argsort(est).tolist() == [0, 1, 2, 3]
    assert tracker.total([2, 3]) == pytest.approx(est[2] + est[3])


def test_blocks_always_held_together_keep_the_priors_proportions() -> None:
    rng = np.random.default_rng(1)
    tracker = BlockEnergy([100, 300, 100])
    for r in range(1, 6):
        tracker.observe(r, [0, 1], _scalars(rng, np.array([1.0, 1.0, 0.0]), [0, 1], 32))
        tracker.observe(r, [2], _scalars(rng, np.array([0.0, 0.0, 5.0]), [2], 32))
    est = tracker.estimate()
    assert est[1] == pytest.approx(3 * est[0])  # only their sum is identified
    assert est[0] + est[1] == pytest.approx(2.0, rel=0.3) and est[2] == pytest.approx(5.0, rel=0.3)


def test_no_report_no_estimate_and_unseen_blocks_get_the_fits_energy_per_parameter() -> None:
    tracker = BlockEnergy([10, 10, 20])
    assert tracker.estimate().tolist() == [0.0, 0.0, 0.0]
    tracker.observe(1, [], [1.0]), tracker.observe(1, [0], [])
    assert not tracker.rows
    tracker.observe(1, [0], [1.0, 2.6457513])  # mean square 4
    assert tracker.estimate() == pytest.approx([4.0, 4.0, 8.0])


def test_energy_scaling_steps_a_client_by_all_blocks_energy_over_its_own() -> None:
    step = StepSize(1e-4, "energy")
    params = [10, 10, 20]
    assert step.client_scale(params, [0, 1, 2], [1.0, 3.0, 4.0]) == pytest.approx(1.0)
    assert step.client_scale(params, [2], [1.0, 3.0, 4.0]) == pytest.approx(2.0)
    assert step.client_scale(params, [0], None) == pytest.approx(4.0)  # parameter counts stand in
    assert step.client_scale(params, [0], [1e-9, 3.0, 4.0]) == MAX_ENERGY_SCALE


def test_a_closed_rounds_scalars_reach_the_status_page(tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2, lr_scaling="energy")
    join(e, "a"), join(e, "b")
    plan = open_next(e)
    for cid in ("a", "b"):
        count = len(plan.assignment_for(cid, 0.0).pool_indices)
        e.accept_report(received(e, cid, [1.0 + 0.1 * t for t in range(count)]))
    e.apply_close(e.decide_close(now=1.0))
    status = run_status(e, "run", {}, now=1.0)
    assert status["block_energy"]["rows"] == 2
    held = sorted({b for p in plan.clients.values() for b in p.blocks})
    assert sum(status["block_energy"]["e_g2"][b] for b in held) > 0
    assert "Gradient energy per block" in render(status)
    # the signal share sits beside it: both clients measured the same indices on common blocks
    signal = status["block_signal"]
    assert len(signal["rho"]) == len(signal["sd"]) == len(status["block_energy"]["e_g2"])
    assert signal["rows"] == (1 if set(plan.clients["a"].blocks) & set(plan.clients["b"].blocks) else 0)
    assert "Signal share per block" in render(status)
    # the next round's energy step reads the new estimate
    assert e.energy is not None and e.footprint is not None
    energy = e.energy.estimate()
    assert e.lr_scale([held[0]]) == pytest.approx(
        min(energy.sum() / energy[held[0]], MAX_ENERGY_SCALE))


def test_a_report_whose_batches_the_trust_region_shrank_is_left_out() -> None:
    tracker = BlockEnergy([10, 10])
    # two batches of 2 directions scaled to the same length: the region's
    shrunk = [0.3, 0.4, 0.5, 0.0]
    tracker.observe(1, [0], shrunk, directions=2)
    assert not tracker.rows
    tracker.observe(1, [0], [0.3, 0.4, 0.1, 0.2], directions=2)
    assert len(tracker.rows) == 1


def test_a_rounds_reports_booked_at_once_keep_the_rows_booking_each_would() -> None:
    rng = np.random.default_rng(3)
    one_by_one, at_once = BlockEnergy([10, 10, 20]), BlockEnergy([10, 10, 20])
    for r in (1, 2):
        reports: list[tuple[list[int], list[float]]] = []
        for i in range(MAX_ROWS + 40):
            blocks = [i % 3] if i % 5 else [0, 2]
            # every 7th report's two batches share one length: clipped, left out
            grads = [0.3, 0.4, 0.5, 0.0] if i % 7 == 0 else rng.normal(size=4).tolist()
            reports.append((blocks, grads))
            one_by_one.observe(r, blocks, grads, directions=2)
        at_once.observe_round(r, reports, directions=2)
    assert list(at_once.rows) == list(one_by_one.rows) and len(at_once.rows) == MAX_ROWS
    assert at_once.estimate().tolist() == one_by_one.estimate().tolist()
