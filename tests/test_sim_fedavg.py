"""fedavg on the simulator: the real fedavg client's loop and the server's average, in one process.

The equality test runs the same two rounds twice: on the simulator, and on the aiohttp server
(as test_simulator_vs_server.py does for zorba) with real clients made of the SDK's pieces, a
`ServerClient` and a `FedAvgTrainer` that downloads the round's weights, trains with AdamW and
uploads its own. Devices, data shards, batch seeds and client ids are matched as there; the
server keeps every version's averaged weights file, and version 2's must equal the
simulator's model bit for bit (one thread, the same operations in the same order; a float
tolerance would hide an averaging order or a weight that differs only slightly).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from client_support import make_world, signal_examples, write_jsonl
from safetensors.numpy import load_file
from test_simulator_vs_server import LOAD, lab_device, ordered_ids, serve_lab_fleet, simulate

from zorba_common.messages import TRAIN
from zorba_common.weight_files import default_weights_dir, version_path
from zorba_edge.client.assembly import build_task
from zorba_edge.client.fedavg import FORWARDS_PER_STEP, FedAvgTrainer
from zorba_edge.model.sources import open_source
from zorba_server.config import config_from_dict
from zorba_sim.fedavg_clients import FedAvgClients
from zorba_sim.fleet import DeviceClass, DeviceGroup, Fleet, FleetError, fleet_from_counts
from zorba_sim.simulation import Simulation, SimulationConfig

CLIENTS, ROUNDS = 3, 2
RUN = {"mode": "fedavg", "seed": 3, "pool_size": 64, "lr": 1e-3, "batch_size": 4, "seq_len": 16,
       "round_duration_s": 60.0, "max_steps": 3, "min_clients": CLIENTS, "min_reports": CLIENTS,
       "poll_timeout_s": 5.0, "keep_weight_versions": True}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def fedavg_weights(sim: Simulation) -> FedAvgClients:
    assert isinstance(sim.training, FedAvgClients)
    return sim.training


async def real_fedavg_client(url: str, index: int, model_dir: Path, data: Path,
                             order: list[asyncio.Event]) -> list[int]:
    """One device: register (in index order), then ROUNDS rounds of download, train, upload,
    report. Returns the sizes of its uploads."""
    async with lab_device(url, index, model_dir, data, order) as device:
        client = device.client
        trainer = FedAvgTrainer(device.source, LOAD, device.joined.run,
                                build_task(device.examples, device.source, device.choice))
        uploads: list[int] = []
        while len(uploads) < ROUNDS:
            answer = await client.next_round(trainer.table.version, wait_s=5)
            trainer.apply_deltas(answer.deltas)
            if answer.status != TRAIN:
                continue
            assignment = answer.assignment
            assert assignment is not None
            if trainer.weights_needed(assignment):
                buffer, version = await client.weights()
                trainer.install_weights(buffer, version)
            outcome = await asyncio.to_thread(trainer.train_round, assignment, threading.Event())
            assert outcome.upload is not None
            uploads.append(await client.upload_weights(assignment.round, outcome.upload))
            ack = await client.report(assignment.round,
                                      outcome.report(assignment, f"real-{index}-{assignment.round}"))
            assert ack is not None
        return uploads


@pytest.mark.asyncio
async def test_a_simulated_fedavg_run_equals_real_fedavg_clients_on_a_real_server_bit_for_bit(
        tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = make_world(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", signal_examples(90))
    sim = simulate(world.model_dir, data, RUN)

    ordered_ids(monkeypatch)
    db = tmp_path / "db.sqlite3"
    _, version, uploads = await serve_lab_fleet(aiohttp_client, db, RUN, real_fedavg_client,
                                                world.model_dir, data)
    assert version == ROUNDS

    assert [r.status for r in sim.records] == ["applied"] * ROUNDS
    assert sim.engine.version == ROUNDS
    weights_dir = default_weights_dir(db)
    served = {v: load_file(str(version_path(weights_dir, v))) for v in (1, 2)}
    simulated = fedavg_weights(sim).weights()
    assert set(served[2]) == set(simulated)
    for name, array in simulated.items():
        assert np.array_equal(array, served[2][name]), name  # bit for bit, not just close
    assert any(not np.array_equal(served[1][n], served[2][n]) for n in simulated)  # round 2 trained
    # The traffic counts the weights file both ways, the size a real client uploads.
    file_bytes = fedavg_weights(sim).file_bytes()
    assert all(size == file_bytes for sizes in uploads for size in sizes)
    first, second = sim.records
    assert first.bytes_up > file_bytes and second.bytes_up > file_bytes
    assert first.bytes_down < file_bytes < second.bytes_down  # version 0 is the base model
    assert second.forwards == ROUNDS * CLIENTS * RUN["max_steps"] * FORWARDS_PER_STEP


def build(root: Path, rounds: int, lr: float = 3e-3) -> Simulation:
    world = make_world(root)
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
        "pool_size": 64, "lr": lr, "batch_size": 4, "seq_len": 16, "round_duration_s": 30,
        "max_steps": 4, "seed": 3, "mode": "fedavg"}})
    config = SimulationConfig(server, rounds=rounds, reference_step_s=1.0)
    return Simulation.build(config, open_source(world.model_dir),
                            fleet_from_counts("laptop-16gb=3,phone-6gb=2"),
                            signal_examples(120), signal_examples(24, seed=1))


def test_fedavg_on_the_simulator_lowers_the_held_out_loss_of_an_easy_task(tmp_path: Path) -> None:
    sim = build(tmp_path, rounds=5)
    _, base_loss = sim.evaluate()
    sim.run()
    losses = [r.eval_loss for r in sim.records if r.eval_loss is not None]
    assert len(losses) == 5 and sim.engine.version == 5
    assert losses[-1] < 0.8 * base_loss
    assert sim.records[-1].accuracy is not None and sim.records[-1].accuracy >= 0.9


def test_a_fedavg_run_resumed_from_its_checkpoint_ends_with_the_same_weights(tmp_path: Path) -> None:
    whole = build(tmp_path / "whole", rounds=3)
    whole.run()
    cut = build(tmp_path / "cut", rounds=3)
    cut.run(checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    resumed = build(tmp_path / "cut2", rounds=3)
    assert resumed.load_checkpoint(tmp_path / "ckpt")
    resumed.run()
    expected = fedavg_weights(whole).weights()
    for name, array in fedavg_weights(resumed).weights().items():
        assert np.array_equal(array, expected[name]), name
    assert [r.bytes_down for r in resumed.records] == [r.bytes_down for r in whole.records]
    assert resumed.forwards == whole.forwards


def test_fedavg_clients_are_admitted_whatever_their_budget_as_on_the_server(tmp_path: Path) -> None:
    """A budget that keeps a device out of a zeroth-order run: a fedavg server admits it anyway
    (its peak is the baseline's finding), and so does the simulator."""
    tiny = DeviceClass("tiny", 4096, speed=1.0, upload_mbps=10, download_mbps=10,
                       source="a budget far below any model")
    world = make_world(tmp_path)

    def simulation(mode: str) -> Simulation:
        server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
            "pool_size": 64, "batch_size": 4, "seq_len": 16, "max_steps": 2, "mode": mode}})
        return Simulation.build(SimulationConfig(server, rounds=1, reference_step_s=1.0),
                                open_source(world.model_dir), Fleet((DeviceGroup(tiny, 2, 0),)),
                                signal_examples(40), signal_examples(8, seed=1))

    with pytest.raises(FleetError, match="cannot take part"):
        simulation("zorba")
    assert simulation("fedavg").run()[0].status == "applied"
