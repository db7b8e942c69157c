"""The drift bound and the fluency watch on a real (tiny) model in the simulator: a huge step
that would carry the blocks far from their base is scaled down (the bound), or, let through,
is noticed in the generic-text loss, rolled back and the run stopped (the watch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from client_support import signal_examples

from zorba_edge.engine.fluency import generic_loss
from zorba_edge.model.sources import open_source
from zorba_server.config import config_from_dict
from zorba_server.drift import block_drift
from zorba_sim.fleet import fleet_from_counts
from zorba_sim.simulation import Simulation, SimulationConfig


def huge_step_run(model_dir: Path, *, max_drift: float = 0.0, fluency: float = 0.0,
                  rounds: int = 4, drift_budget: float = 0.0, run: bool = True) -> Simulation:
    """lr 1e3 with the loss guard, the trust region and the drift budget off: nothing else
    stands in the way (`run` False: built, not run)."""
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
        "pool_size": 64, "lr": 1e3, "mu": 1e-3, "batch_size": 4, "seq_len": 16,
        "round_duration_s": 30, "max_steps": 4, "seed": 3, "loss_jump_tolerance": 0.0,
        "loss_drift_rounds": 0, "plateau_rounds": 0, "trust_radius": 0.0, "max_drift": max_drift,
        "estimator": "antithetic", "directions": 1, "fluency_tolerance": fluency,
        "drift_budget": drift_budget}})
    config = SimulationConfig(server, rounds=rounds, reference_step_s=1.0, eval_every=1)
    sim = Simulation.build(config, open_source(model_dir), fleet_from_counts("laptop-16gb=3"),
                           signal_examples(120), signal_examples(24, seed=1))
    if run:
        sim.run()
    return sim


def test_the_drift_bound_keeps_every_block_within_it_and_says_so(model_dir: Path) -> None:
    free = huge_step_run(model_dir, rounds=2)
    bounded = huge_step_run(model_dir, max_drift=0.05, rounds=2)
    assert free.engine.alpha is not None and bounded.engine.alpha is not None
    assert free.engine.base_rms is not None
    assert block_drift(free.engine.alpha, free.engine.base_rms).max() > 0.05
    drift = block_drift(bounded.engine.alpha, free.engine.base_rms)
    assert drift.max() == pytest.approx(0.05, rel=1e-4)
    assert any("run.max_drift = 0.05" in h.message for h in bounded.engine.history)


def test_the_simulator_probes_its_model_and_the_drift_budget_bounds_every_block(model_dir: Path) -> None:
    sim = huge_step_run(model_dir, fluency=0.2, drift_budget=0.5, rounds=2)
    kappa = sim.engine.fluency_curvature
    assert kappa is not None and kappa > 0
    bound = sim.engine.max_move()
    assert bound == pytest.approx((0.5 * 0.2 / kappa) ** 0.5)
    assert sim.engine.alpha is not None
    move = block_drift(sim.engine.body_alpha(), (1.0,) * sim.engine.body_alpha().shape[1])
    assert move.max() == pytest.approx(bound, rel=1e-4)
    assert any("the drift budget" in h.message for h in sim.engine.history)
    assert not any(r.stopped for r in sim.records)  # the watch had nothing to roll back


def test_the_simulators_probe_leaves_its_model_bit_for_bit_as_it_was(model_dir: Path) -> None:
    probed = huge_step_run(model_dir, fluency=0.2, drift_budget=0.5, run=False)
    plain = huge_step_run(model_dir, fluency=0.2, drift_budget=0.0, run=False)
    assert probed.engine.fluency_curvature is not None and plain.engine.fluency_curvature is None
    a, b = probed.all_blocks(), plain.all_blocks()
    for block in a:
        for (name, x), (_, y) in zip(a[block], b[block], strict=True):
            assert torch.equal(x, y), (block, name)


def test_broken_generation_is_rolled_back_to_the_last_fluent_version_and_stops_the_run(
        model_dir: Path) -> None:
    # A random tiny model predicts text no better than chance, so a huge step raises its
    # generic-text loss by ~1% only (4.83 -> 4.88); the tolerance is small here, the rule the
    # same at any tolerance.
    sim = huge_step_run(model_dir, fluency=0.005)
    stopped = [r for r in sim.records if r.stopped]
    assert len(stopped) == 1 and stopped[0] is sim.records[-1] and len(sim.records) < 4
    assert "generation broke" in stopped[0].stopped and "rolled back to version" in stopped[0].stopped
    assert sim.base_generic_loss is not None and stopped[0].generic_loss is not None
    assert stopped[0].generic_loss > 1.005 * sim.base_generic_loss
    # The model and the table are the last fluent version's: its generic loss is within bound.
    assert sim.fluent is not None
    _, alpha = sim.fluent
    assert sim.engine.alpha is not None and np.array_equal(sim.engine.alpha, alpha)
    assert generic_loss(sim.loaded.model, sim.generic) <= 1.005 * sim.base_generic_loss
