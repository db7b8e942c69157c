"""The Flower app and zorba-edge's own simulator, given the same run, seeds, fleet and data,
publish the same coefficient table bit for bit.

The Flower side is the server app's loop over the fake grid with the real ClientApp in this
process (no Ray, no SuperLink); the simulator's side is tests/flower_twin.py. Two nodes with
budgets of one block each train different blocks; two rounds, so the second trains on a
model moved by the first.

Why two rounds and not more: the simulator moves its one model by each round's increments
in place, while a Flower node (any process may serve it next) rebuilds the model from base +
the table. Both evaluate theta0 - sum alpha z; at version 1 they do the same float
operations, from version 2 on the in-place path adds round by round what the rebuild adds
per pool index at once, and fp32 rounds them differently (docs/flower.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the Flower app needs the `flower` extra (pip install -e '.[flower]')")

from client_support import make_world, signal_examples  # noqa: E402
from flower_fakes import FakeGrid, node_handler  # noqa: E402
from flower_twin import twin_simulation  # noqa: E402

from zorba_flower.client_app import make_client_app  # noqa: E402
from zorba_flower.server_loop import FlowerRounds, LoopSettings  # noqa: E402
from zorba_flower.settings import server_config  # noqa: E402
from zorba_server.engine import RoundEngine  # noqa: E402
from zorba_server.rounds import APPLIED  # noqa: E402

ONE_BLOCK_MIB = 0.2282
"""The tiny model's fixed part and one block, by its own fp32 memory model (0.2281 MiB)."""
BUDGETS = (ONE_BLOCK_MIB, ONE_BLOCK_MIB + 0.01)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def run_values(world_dir: Path) -> dict[str, object]:
    return {"run.pool-size": 16, "run.max-rounds": 2, "run.min-clients": 2, "run.min-steps": 2,
            "run.max-steps": 2, "run.batch-size": 2, "run.seq-len": 16, "run.lr": 0.01,
            "run.seed": 3, "run.round-duration-s": 120.0, "run.memory-headroom": 0.0,
            "client.model": str(world_dir / "model"), "client.data": str(world_dir / "data.jsonl"),
            "client.data-seed": 1, "client.frozen-dtype": "fp32", "client.runtime-mib": 0.0,
            "client.step-time-s": 0.05, "client.report-peak-memory": False}


@pytest.mark.slow
def test_a_flower_run_publishes_the_table_zorba_sim_publishes_bit_for_bit(tmp_path: Path) -> None:
    world = make_world(tmp_path / "world")
    values = run_values(world.model_dir.parent)
    app = make_client_app(values)  # one process for both nodes, as a Ray actor may be
    engine = RoundEngine(server_config(values))
    loop = FlowerRounds(engine, LoopSettings(tmp_path / "ckpt", "run-1", max_idle_s=0.0))
    loop.run(FakeGrid({p + 1: node_handler(app, p + 1, {"partition-id": p, "num-partitions": 2,
                                                        "budget-mib": b})
                       for p, b in enumerate(BUDGETS)}))
    sim = twin_simulation(values, BUDGETS, signal_examples(8, seed=1))

    assert [r.status for r in loop.rounds] == [APPLIED, APPLIED]
    assert [r.status for r in sim.records] == [APPLIED, APPLIED]
    # The nodes train a block each, so the schedule, not only the estimator, is compared.
    assert all(sorted(r.assigned.values()) == [(0,), (1,)] for r in loop.rounds)
    assert engine.alpha is not None and sim.engine.alpha is not None
    assert np.count_nonzero(engine.alpha) > 0
    # Round by round: each published delta (its float32 values as bytes) is the same.
    assert list(engine.deltas) == list(sim.engine.deltas)
    assert engine.alpha.astype("<f8").tobytes() == sim.engine.alpha.astype("<f8").tobytes()
