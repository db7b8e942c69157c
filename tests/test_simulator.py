"""The in-process simulator: virtual devices on the real engine and trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from client_support import make_world, signal_examples
from packaged_assets import CUDA_REASON

from zorba_edge.model.sources import open_source
from zorba_server.config import config_from_dict
from zorba_sim.fleet import fleet_from_counts
from zorba_sim.simulation import Simulation, SimulationConfig


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def build(root: Path, rounds: int = 3, fleet: str = "laptop-16gb=3,phone-6gb=2",
          device: str = "cpu", **run: object) -> Simulation:
    world = make_world(root)
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
        "pool_size": 64, "lr": 1e-3, "mu": 1e-3, "batch_size": 4, "seq_len": 16,
        "round_duration_s": 30, "max_steps": 4, "seed": 3, **run}})
    config = SimulationConfig(server, rounds=rounds, reference_step_s=1.0, device=device)
    return Simulation.build(config, open_source(world.model_dir), fleet_from_counts(fleet),
                            signal_examples(120), signal_examples(24, seed=1))


def test_the_same_seeds_give_the_same_alpha_bit_for_bit(tmp_path: Path) -> None:
    first = build(tmp_path / "a")
    first.run()
    second = build(tmp_path / "b")
    second.run()
    assert first.engine.version == 3
    assert first.alpha_hash() == second.alpha_hash()
    assert [r.forwards for r in first.records] == [r.forwards for r in second.records]


def test_disjoint_slices_move_each_block_along_more_directions_at_more_bytes(
        tmp_path: Path) -> None:
    shared = build(tmp_path / "shared", rounds=2)
    shared.run()
    disjoint = build(tmp_path / "disjoint", rounds=2, pool_slices="disjoint")
    disjoint.run()
    assert shared.engine.alpha is not None and disjoint.engine.alpha is not None
    rows = [int((table != 0).any(axis=1).sum())
            for table in (shared.engine.alpha, disjoint.engine.alpha)]
    assert rows[1] > rows[0]  # 2 rounds x 4 steps at most shared; every client's own here
    assert sum(r.bytes_down for r in disjoint.records) > sum(r.bytes_down for r in shared.records)
    again = build(tmp_path / "again", rounds=2, pool_slices="disjoint")
    again.run()
    assert again.alpha_hash() == disjoint.alpha_hash()


def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    whole = build(tmp_path / "whole", rounds=4)
    whole.run()
    interrupted = build(tmp_path / "cut", rounds=4)
    interrupted.run(checkpoint_dir=tmp_path / "ckpt", stop_after=2)
    resumed = build(tmp_path / "cut2", rounds=4)
    assert resumed.load_checkpoint(tmp_path / "ckpt")
    assert len(resumed.records) == 2
    resumed.run(checkpoint_dir=tmp_path / "ckpt")
    assert resumed.alpha_hash() == whole.alpha_hash()
    assert resumed.forwards == whole.forwards


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_on_cuda_the_same_seeds_give_the_same_alpha_and_the_model_stays_on_the_gpu(
        tmp_path: Path) -> None:
    hashes = []
    for name in ("a", "b"):
        sim = build(tmp_path / name, device="cuda")
        assert next(sim.loaded.model.parameters()).device.type == "cuda"
        sim.run()
        hashes.append(sim.alpha_hash())
        assert sim.engine.version == 3 and sim.records[-1].accuracy is not None
    assert hashes[0] == hashes[1]
