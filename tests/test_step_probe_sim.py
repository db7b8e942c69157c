"""The simulator probes the task loss on its first clients' data (run.step_rule = probe) and
leaves its model bit for bit as it was."""

from __future__ import annotations

from pathlib import Path

import torch
from client_support import signal_examples

from zorba_edge.model.sources import open_source
from zorba_server.config import config_from_dict
from zorba_server.step_rule import best_lr
from zorba_sim.fleet import fleet_from_counts
from zorba_sim.simulation import Simulation, SimulationConfig


def built(model_dir: Path, step_rule: str) -> Simulation:
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
        "pool_size": 64, "lr": 1e-4, "batch_size": 4, "seq_len": 16, "round_duration_s": 30,
        "max_steps": 4, "seed": 3, "step_rule": step_rule, "drift_budget": 0.0}})
    config = SimulationConfig(server, rounds=1, reference_step_s=1.0)
    return Simulation.build(config, open_source(model_dir), fleet_from_counts("laptop-16gb=3"),
                            signal_examples(120), signal_examples(24, seed=1))


def test_the_simulator_sets_the_step_from_its_clients_probes_and_restores_its_model(
        model_dir: Path) -> None:
    probed, plain = built(model_dir, "probe"), built(model_dir, "constant")
    sent = [(cid, m.profile.task_probe) for cid, m in probed.engine.members.items()]
    assert len(sent) == 3 and all(p is not None and p.batch_size == 4 for _, p in sent)
    assert all(m.profile.task_probe is None for m in plain.engine.members.values())
    lrs = sorted(v for _, p in sent if p is not None and (v := best_lr(p, 4, 4, 0.03)) is not None)
    assert lrs, "the tiny model's probes should carry a signal and a curvature"
    assert probed.engine.hyper().lr == probed.engine.probed_step.lr == lrs[(len(lrs) - 1) // 2]
    assert plain.engine.hyper().lr == 1e-4
    a, b = probed.all_blocks(), plain.all_blocks()
    for block in a:
        for (name, x), (_, y) in zip(a[block], b[block], strict=True):
            assert torch.equal(x, y), (block, name)
