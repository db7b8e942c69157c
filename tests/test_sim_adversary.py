"""Malicious virtual clients (zorba_sim/adversary.py) through the real engine and aggregation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from client_support import make_world, signal_examples

from zorba_common.messages import HyperParams
from zorba_edge.model.sources import open_source
from zorba_server.config import AggregationConfig, config_from_dict
from zorba_server.rounds import ClientPlan, RoundPlan
from zorba_sim.adversary import Adversary, FlipSigns, GuardVeto, ScaleScalars, exposure
from zorba_sim.fleet import GIB, DeviceClass, DeviceGroup, Fleet
from zorba_sim.simulation import Simulation, SimulationConfig

ATTACKER = "v000000"
LAB = DeviceClass("lab", 6 * GIB, 1.0, 50, 50)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("world")).model_dir


def run(model_dir: Path, aggregation: AggregationConfig, adversary: Adversary | None,
        rounds: int = 2, clients: int = 10, **run_settings: float) -> Simulation:
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
        "pool_size": 64, "lr": 1e-3, "mu": 1e-3, "batch_size": 4, "seq_len": 16,
        "round_duration_s": 30, "max_steps": 2, "seed": 3} | run_settings})
    server = dataclasses.replace(server, aggregation=aggregation)
    config = SimulationConfig(server, rounds=rounds, reference_step_s=1.0,
                              eval_every=rounds + 1)
    sim = Simulation.build(config, open_source(model_dir), Fleet((DeviceGroup(LAB, clients, 0),)),
                           signal_examples(200), signal_examples(8, seed=1))
    if adversary is not None:
        sim.adversaries = {ATTACKER: adversary}
    sim.run()
    return sim


def alpha(sim: Simulation) -> np.ndarray:
    assert sim.engine.alpha is not None
    return sim.engine.alpha


def test_an_identity_adversary_changes_nothing_and_its_reports_reach_the_engine(world: Path) -> None:
    clean = run(world, AggregationConfig(), None)
    identity = Adversary()
    hooked = run(world, AggregationConfig(), identity)
    assert identity.sent == 2 and not identity.refused
    assert hooked.alpha_hash() == clean.alpha_hash()
    assert np.abs(alpha(clean)).max() > 0  # the run moved alpha: the equality says something


def test_the_attackers_scalars_are_what_the_engine_aggregates(world: Path) -> None:
    clean = run(world, AggregationConfig(), None, rounds=1)
    flipped = run(world, AggregationConfig(), FlipSigns(), rounds=1)
    assert not np.array_equal(alpha(clean), alpha(flipped))
    reports = flipped.engine.history[-1].reports
    assert reports == 10


def test_a_scaling_attacker_moves_alpha_under_mean_far_more_than_under_robust_rules(
        world: Path) -> None:
    moved = {}
    rules = {"mean": AggregationConfig(method="mean"),
             "median": AggregationConfig(method="median"),
             # 10 voters: the default 0.1 trims one from each end.
             "trimmed_mean": AggregationConfig(method="trimmed_mean", trim_fraction=0.1)}
    for name, aggregation in rules.items():
        clean = run(world, aggregation, None, rounds=1)
        attack = ScaleScalars(factor=1e4)
        attacked = run(world, aggregation, attack, rounds=1)
        assert attack.sent == 1 and not attack.refused
        plan = attacked.engine.last_plan
        assert plan is not None
        seen = exposure(plan, ATTACKER, aggregation)
        # The robust rules really could outvote it on every block it held (or the
        # comparison below would be about the schedule, not the rule).
        assert seen.attacker_blocks > 0
        assert seen.outvoted_blocks == (0 if name == "mean" else seen.attacker_blocks)
        moved[name] = float(np.linalg.norm(alpha(attacked) - alpha(clean)))
    assert moved["mean"] > 0
    assert moved["mean"] > 20 * moved["median"]
    assert moved["mean"] > 20 * moved["trimmed_mean"]


def test_a_report_the_engine_refuses_is_dropped_and_counted(world: Path) -> None:
    attack = ScaleScalars(factor=1e12)  # past max_abs_scalar (1e6)
    sim = run(world, AggregationConfig(), attack, rounds=1)
    assert attack.sent == 1 and len(attack.refused) == 1
    assert "exceeds the run's limit" in attack.refused[0][1]
    assert sim.engine.history[-1].reports == 9 and sim.engine.version == 1


def plan_with(holders: dict[str, tuple[int, ...]]) -> RoundPlan:
    return RoundPlan(round=1, base_version=0, opened_at=0.0, deadline=30.0,
                     hyper=HyperParams(1e-3, 1e-3, 4, 16), pool_indices=(5,),
                     clients={cid: ClientPlan(blocks, 1) for cid, blocks in holders.items()})


def test_exposure_needs_three_voters_for_the_median_and_one_over_f_for_a_trimmed_mean() -> None:
    # Block 0 on nine clients (the attacker among them), block 1 on the attacker and one other.
    holders = {f"c{i}": (0,) for i in range(1, 8)} | {"c8": (0, 1), ATTACKER: (0, 1)}
    plan = plan_with(holders)
    median = exposure(plan, ATTACKER, AggregationConfig(method="median"))
    assert (median.attacker_blocks, median.voters_min, median.voters_max) == (2, 2, 9)
    assert median.outvoted_blocks == 1  # two voters: the median is their mean
    trimmed = exposure(plan, ATTACKER, AggregationConfig(method="trimmed_mean", trim_fraction=0.1))
    assert trimmed.outvoted_blocks == 0  # floor(0.1 x 9) = 0: nothing is trimmed
    wider = exposure(plan, ATTACKER, AggregationConfig(method="trimmed_mean", trim_fraction=0.2))
    assert wider.outvoted_blocks == 1
    assert exposure(plan, ATTACKER, AggregationConfig()).outvoted_blocks == 0
    assert exposure(plan, "absent", AggregationConfig()).attacker_blocks == 0


def test_one_client_of_four_cannot_veto_the_loss_guard_with_its_check_losses(world: Path) -> None:
    """Issue 27's attack through the simulator: check loss 0.0, then 1e6 (a weighted mean
    judged: 7 of 8 rounds rolled back, the step at x0.0078)."""
    veto = GuardVeto()
    sim = run(world, AggregationConfig(method="median"), veto, rounds=5, clients=4,
              loss_jump_tolerance=0.5)
    assert veto.sent == 5
    assert [h.status for h in sim.engine.history] == ["applied"] * 5
    assert sim.engine.lr_factor() == 1.0
    assert sim.engine.guard_quarantined() == {ATTACKER}
