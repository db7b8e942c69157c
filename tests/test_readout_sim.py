"""The label readout in a run (issue 26): the simulator and real clients on a real server move
block R alike, and the rows the clients hold are the server's table rebuilt."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from client_support import make_world, signal_examples, write_jsonl
from test_simulator_vs_server import (
    CLIENTS,
    LOAD,
    ROUNDS,
    RUN,
    lab_device,
    ordered_ids,
    serve_lab_fleet,
    simulate,
)

from zorba_common.messages import TRAIN
from zorba_common.readout import readout_block
from zorba_edge.client.assembly import build_task
from zorba_edge.client.trainer import LocalTrainer
from zorba_edge.engine.coefficients import CoefficientTable, materialize_block_
from zorba_edge.model.readout import LabelReadout
from zorba_sim.client_training import ZOClients

READOUT_RUN = RUN | {"readout_directions": 3, "readout_lr": 0.05}


async def readout_client(url: str, index: int, model_dir: Path, data: Path,
                         order: list[Any]) -> tuple[list[Any], torch.Tensor, CoefficientTable]:
    """One device: ROUNDS rounds, then one more poll to sync to the last version; its reports'
    readout scalars, its synced rows and its table."""
    async with lab_device(url, index, model_dir, data, order) as device:
        client, joined = device.client, device.joined
        trainer = LocalTrainer(device.source, LOAD, joined.run,
                               build_task(device.examples, device.source, device.choice))
        readout_scalars, rounds = [], 0
        while rounds < ROUNDS:
            answer = await client.next_round(trainer.table.version, wait_s=5)
            trainer.apply_deltas(answer.deltas)
            if answer.status != TRAIN:
                continue
            assert answer.assignment is not None
            outcome = await asyncio.to_thread(trainer.train_round, answer.assignment,
                                              threading.Event())
            readout_scalars.append(outcome.readout_steps)
            await client.report(answer.assignment.round,
                                outcome.report(answer.assignment, f"real-{index}-{rounds}"))
            rounds += 1
        while trainer.table.version < ROUNDS:  # the last round's delta
            trainer.apply_deltas((await client.next_round(trainer.table.version, wait_s=5)).deltas)
        assert trainer.readout is not None
        return readout_scalars, trainer.readout.rows.detach().clone(), trainer.table


@pytest.mark.asyncio
async def test_a_readout_run_moves_column_r_alike_in_the_simulator_and_on_a_real_server(
        tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = make_world(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", signal_examples(90))
    sim = simulate(world.model_dir, data, READOUT_RUN)

    ordered_ids(monkeypatch)
    url, version, results = await serve_lab_fleet(aiohttp_client, tmp_path / "db", READOUT_RUN,
                                                  readout_client, world.model_dir, data)
    assert sim.engine.alpha is not None and version == sim.engine.version == ROUNDS
    num_blocks = sim.loaded.num_blocks
    column = readout_block(num_blocks)
    assert sim.engine.alpha.shape[1] == num_blocks + 1
    assert np.count_nonzero(sim.engine.alpha[:, column]) > 0  # the readout moved
    for scalars, rows, table in results:
        assert all(len(s) > 0 for s in scalars)  # every report carried readout scalars
        # Bit for bit the simulator's table: the same scalars from the same hidden states.
        assert table.values.astype("<f8").tobytes() == sim.engine.alpha.astype("<f8").tobytes()
        # The rows a client holds are the table's column R on the base head's rows.
        rebuilt = LabelReadout(sim.loaded.model.get_output_embeddings(),
                               rows_of(sim).token_ids.tolist())
        materialize_block_(rebuilt.tensors(), READOUT_RUN["seed"], column, table.column(column))
        torch.testing.assert_close(rows, rebuilt.rows.detach(), rtol=1e-6, atol=1e-7)
        assert float((rows - rows_of(sim).rows.detach()).abs().max()) == 0.0  # as the simulator's
    assert len(results) == CLIENTS


def rows_of(sim: Any) -> LabelReadout:
    training = sim.training
    assert isinstance(training, ZOClients) and training.readout is not None
    return training.readout


def test_a_readout_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(
        tmp_path: Path) -> None:
    from test_simulator import build

    readout = {"readout_directions": 4, "readout_lr": 0.05}
    whole = build(tmp_path / "whole", rounds=3, **readout)
    whole.run()
    interrupted = build(tmp_path / "cut", rounds=3, **readout)
    interrupted.run(checkpoint_dir=tmp_path / "ckpt", stop_after=2)
    resumed = build(tmp_path / "cut2", rounds=3, **readout)
    assert resumed.load_checkpoint(tmp_path / "ckpt")
    resumed.run(checkpoint_dir=tmp_path / "ckpt")
    assert whole.engine.alpha is not None
    assert np.count_nonzero(whole.engine.alpha[:, readout_block(whole.loaded.num_blocks)]) > 0
    assert resumed.alpha_hash() == whole.alpha_hash()
    assert torch.equal(rows_of(resumed).rows, rows_of(whole).rows)
