"""The loss guard and the trust region on a real (tiny) model: a deliberately huge step is
noticed and undone (the guard), or never taken at its size (the trust region)."""

from __future__ import annotations

from pathlib import Path

from client_support import signal_examples

from zorba_edge.model.sources import open_source
from zorba_server.config import config_from_dict
from zorba_server.rounds import REJECTED
from zorba_sim.fleet import fleet_from_counts
from zorba_sim.simulation import Simulation, SimulationConfig


def huge_step_run(model_dir: Path, tolerance: float, radius: float = 0.0) -> Simulation:
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
        "pool_size": 64, "lr": 1e3, "mu": 1e-3, "batch_size": 4, "seq_len": 16,
        "round_duration_s": 30, "max_steps": 4, "seed": 3, "loss_jump_tolerance": tolerance,
        "trust_radius": radius,
        "drift_budget": 0.0,  # the budget would bound the huge step first: the guard alone here
        "estimator": "antithetic", "directions": 1}})  # four steps a round, each its own batch
    config = SimulationConfig(server, rounds=4, reference_step_s=1.0, eval_every=1)
    sim = Simulation.build(config, open_source(model_dir), fleet_from_counts("laptop-16gb=3"),
                           signal_examples(120), signal_examples(24, seed=1))
    sim.run()
    return sim


def test_a_huge_step_is_rolled_back_and_the_model_ends_where_it_started(model_dir: Path) -> None:
    # The tiny two-label model cannot get much worse than chance (ln 2 = 0.693 from 0.686), so
    # the tolerance is small here; the rule is the same at any tolerance.
    guarded = huge_step_run(model_dir, 0.02)
    unguarded = huge_step_run(model_dir, 0.0)
    rolled = [h for h in guarded.engine.history if h.status == REJECTED]
    assert rolled, [h.message for h in guarded.engine.history]
    # The clients' check batches show the damage a round later, and the table goes back.
    assert all("not applied" in h.message for h in rolled)
    assert "rolled back to version" in rolled[0].message
    assert guarded.engine.lr_factor() <= 0.5
    # The results show each round's step and the check losses the guard judged.
    assert guarded.records[0].lr == 1e3 and min(r.lr or 1e3 for r in guarded.records) <= 500
    assert all(r.loss_check is not None and r.loss_check > 0
               for r in guarded.records if r.reports)
    # Unguarded, the damage of lr 1e3 stays; guarded, the table went back.
    end_guarded, end_unguarded = guarded.evaluate()[1], unguarded.evaluate()[1]
    assert end_unguarded > 0.70 and end_guarded < end_unguarded - 0.01


def test_the_trust_region_shrinks_a_huge_step_before_it_does_damage(model_dir: Path) -> None:
    untrusted = huge_step_run(model_dir, 0.0)
    trusted = huge_step_run(model_dir, 0.0, radius=0.01)  # the guard off: the region alone
    assert sum(r.shrunk_batches for r in trusted.records) > 0
    assert not any(r.shrunk_batches for r in untrusted.records)
    assert all(h.status != REJECTED for h in trusted.engine.history)
    # Every step of lr 1e3 moved far less: the largest coefficient, and the end loss.
    assert trusted.engine.alpha is not None and untrusted.engine.alpha is not None
    assert abs(trusted.engine.alpha).max() < 0.2 * abs(untrusted.engine.alpha).max()
    end_trusted, end_untrusted = trusted.evaluate()[1], untrusted.evaluate()[1]
    assert end_untrusted > 0.70 and end_trusted < end_untrusted - 0.01
