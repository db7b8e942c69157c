"""The Flower ClientApp on a tiny real model, called in this process through the fake grid
(no Flower processes): nodes with different budgets train different blocks of the same
model with the local trainer, and a node's rounds do not depend on which process served it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower app needs the `flower` extra (pip install -e '.[flower]')")

from client_support import make_world  # noqa: E402
from flower_fakes import FakeGrid, node_handler  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from zorba_flower.client_app import make_client_app  # noqa: E402
from zorba_flower.server_loop import FlowerRounds, LoopSettings  # noqa: E402
from zorba_flower.settings import server_config  # noqa: E402
from zorba_server.engine import RoundEngine  # noqa: E402
from zorba_server.rounds import APPLIED, CHECKED  # noqa: E402

RUN = {"run.pool-size": 16, "run.max-rounds": 2, "run.min-clients": 2, "run.min-steps": 2,
       "run.max-steps": 2, "run.batch-size": 2, "run.seq-len": 16, "run.lr": 0.01,
       "run.round-duration-s": 120.0, "run.memory-headroom": 0.0}


def client_config(world_dir: Path) -> dict[str, object]:
    return {"client.model": str(world_dir / "model"), "client.data": str(world_dir / "data.jsonl"),
            "client.frozen-dtype": "fp32", "client.runtime-mib": 0.0, "client.step-time-s": 0.05,
            "client.report-peak-memory": False}


def run_two_nodes(tmp_path: Path, world_dir: Path, budgets_mib: tuple[float, float],
                  apps: tuple[ClientApp, ClientApp]) -> FlowerRounds:
    engine = RoundEngine(server_config(RUN))
    nodes = {n + 1: node_handler(apps[n], n + 1, {"partition-id": n, "num-partitions": 2,
                                             "budget-mib": budgets_mib[n]}) for n in range(2)}
    loop = FlowerRounds(engine, LoopSettings(tmp_path / "ckpt", "run-1", max_idle_s=0.0))
    loop.run(FakeGrid(nodes))
    return loop


@pytest.mark.slow
def test_the_client_app_trains_each_nodes_budget_and_is_deterministic(tmp_path: Path) -> None:
    world = make_world(tmp_path / "world")
    world_dir = world.model_dir.parent
    overrides = client_config(world_dir)
    # Budgets from the model's own memory model: one block for node 1, both for node 2.
    probe = run_two_nodes(tmp_path / "a", world_dir, (1e6, 1e6),
                          (make_client_app(overrides), make_client_app(overrides)))
    model = probe.engine.memory_model(next(iter(probe.engine.members.values())).profile, 1.0)
    # Half a block of slack: with frozen blocks in fp32 and the revert's snapshot on disk, a
    # trainable block costs only what its direction and update need (about a kilobyte here).
    slack = min(model.block_bytes) // 2
    one = (model.fixed_bytes + max(model.block_bytes) + slack) / 2**20
    both = (model.fixed_bytes + sum(model.block_bytes) + slack) / 2**20

    shared = make_client_app(overrides)  # one process serving both nodes, as a Ray actor may
    first = run_two_nodes(tmp_path / "b", world_dir, (one, both), (shared, shared))
    again = run_two_nodes(tmp_path / "c", world_dir, (one, both),
                          (make_client_app(overrides), make_client_app(overrides)))
    assert [r.status for r in first.rounds] == [APPLIED, APPLIED, CHECKED]  # (the final check)
    for r in first.rounds:
        assert len(r.assigned[1]) == 1 and r.reported == (1, 2)
        assert all(t.train_s > 0 and t.rss_peak_bytes > 0 for t in r.timings)
    assert first.engine.alpha is not None and np.count_nonzero(first.engine.alpha) > 0
    # Whichever process served which node, the same table comes out, bit for bit.
    assert np.array_equal(first.engine.alpha, again.engine.alpha)
