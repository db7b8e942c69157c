"""A simulated run equals a real server with real clients, given the same seeds, bit for bit.

The real side is the aiohttp app in this process (as in test_server_api.py) and, per client,
the SDK's own pieces: `ServerClient` (the transport), the client's data assembly
(`training_examples` / `build_task`: its Dirichlet share and batch seed) and a `LocalTrainer`
holding its assigned blocks trainable and the others frozen in fp32. What is matched:

- the run: one server config for both (seed, pool, lr, mu, batch, seq len, round length);
- the devices: each registers the profile a virtual device declares (budget, a claimed step
  time of 0.01 s, its sample count, the fp32 memory profile the trainer really uses), in the
  simulator's order; the coordinator's random client ids are replaced by ordered ones, because
  the aggregation adds clients in id order and float addition is not associative;
- the data: the same JSONL file; the test checks that every client's examples are the
  virtual client's shard;
- the model: frozen blocks in fp32, so the only difference left is that the simulator holds
  every block trainable and perturbs only the assigned ones.

Two rounds run, so the second also checks that a client's sync (deltas applied to its held
blocks, the rest re-materialised) moves the model exactly as the simulator does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from client_support import make_world, signal_examples, write_jsonl

from zorba_common.messages import TRAIN, DeviceProfile, RegisterRequest, RegisterResponse
from zorba_edge.client.assembly import (
    DataChoice,
    build_task,
    footprint_of,
    memory_profile,
    training_examples,
)
from zorba_edge.client.trainer import LocalTrainer
from zorba_edge.client.transport import ServerClient
from zorba_edge.data.jsonl import load_classification_jsonl
from zorba_edge.data.templates import SENTIMENT_TEMPLATE
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import ModelSource, open_source
from zorba_server import coordinator, enrolment
from zorba_server.app import SERVICES, create_app
from zorba_server.config import config_from_dict
from zorba_sim.fleet import GIB, DeviceClass, DeviceGroup, Fleet
from zorba_sim.simulation import Simulation, SimulationConfig

pytestmark = pytest.mark.asyncio

SECRET = "sim-vs-server-secret"
CLIENTS, ROUNDS, STEP_S, DATA_SEED = 3, 2, 0.01, 0
RUN = {"seed": 3, "pool_size": 64, "lr": 1e-3, "mu": 1e-3, "batch_size": 4, "seq_len": 16,
       "round_duration_s": 60.0, "max_steps": 4, "min_clients": CLIENTS, "min_reports": CLIENTS,
       "poll_timeout_s": 5.0}
LAB = DeviceClass("lab", 4 * GIB, speed=1.0, upload_mbps=1000, download_mbps=1000,
                  availability=1.0, dropout=0.0, source="a test device that never fails")
LOAD = LoadConfig(train_dtype="fp32", frozen_dtype="fp32")


def ordered_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enrolment names clients "c-" + token_hex(8): make those hex strings count up (the
    coordinator's run id draws from the same counter)."""
    counter = iter(range(1 << 30))
    ordered = SimpleNamespace(token_hex=lambda n: f"{next(counter):0{2 * n}x}",
                              token_urlsafe=secrets.token_urlsafe)
    monkeypatch.setattr(coordinator, "secrets", ordered)
    monkeypatch.setattr(enrolment, "secrets", ordered)


def simulate(model_dir: Path, data: Path, run: dict[str, Any] = RUN) -> Simulation:
    server = config_from_dict({"enrolment_secret": SECRET, "run": run})
    config = SimulationConfig(server, rounds=ROUNDS, reference_step_s=STEP_S, data_seed=DATA_SEED,
                              memory=memory_profile(LOAD, None))
    examples = load_classification_jsonl(data, SENTIMENT_TEMPLATE.label_names)
    sim = Simulation.build(config, open_source(model_dir), Fleet((DeviceGroup(LAB, CLIENTS, 0),)),
                           examples, signal_examples(16, seed=1))
    sim.run()
    return sim


@dataclass
class LabDevice:
    """A real device of the lab fleet, registered: its connection and what it trains on."""

    client: ServerClient
    joined: RegisterResponse
    source: ModelSource
    choice: DataChoice
    examples: list[Any]


@contextlib.asynccontextmanager
async def lab_device(url: str, index: int, model_dir: Path, data: Path,
                     order: list[asyncio.Event]) -> AsyncIterator[LabDevice]:
    """Device `index` of the lab fleet, registered after device index - 1 (so the server's
    client ids and the simulator's follow the same order), with the simulator's data shard."""
    source = open_source(model_dir)
    choice = DataChoice(str(data), num_clients=CLIENTS, client_index=index, seed=DATA_SEED)
    examples = training_examples(choice)
    profile = DeviceProfile("cpu", LAB.memory_budget_bytes, STEP_S, len(examples), footprint_of(source),
                            source.fingerprint, memory_profile(LOAD, None), name=f"real-{index}")
    async with ServerClient(url) as client:
        if index > 0:
            await order[index - 1].wait()
        joined = await client.register(RegisterRequest(SECRET, profile))
        order[index].set()
        client.token = joined.token
        yield LabDevice(client, joined, source, choice, examples)


async def serve_lab_fleet(aiohttp_client: Any, db: Path, run: dict[str, Any], device: Any,
                          model_dir: Path, data: Path) -> tuple[str, int, list[Any]]:
    """A real server for `run` and the lab fleet, each device running `device(url, index,
    model_dir, data, order)`: (the server's URL, its version once the last report's round has
    closed, each device's result)."""
    config = config_from_dict({"enrolment_secret": SECRET, "storage": {"path": str(db)}, "run": run})
    http = await aiohttp_client(create_app(config))
    url = str(http.make_url(""))
    order = [asyncio.Event() for _ in range(CLIENTS)]
    results = await asyncio.wait_for(asyncio.gather(*(
        device(url, i, model_dir, data, order) for i in range(CLIENTS))), 240)
    coordinator_ = http.app[SERVICES].coordinator
    # The last report closes the last round in the server's own task: wait for that close
    # (the event, whatever its outcome; pytest's timeout bounds it), not for 10 s of wall time.
    while len(coordinator_.engine.history) < ROUNDS:
        await asyncio.sleep(0.05)
    return url, coordinator_.engine.version, list(results)


async def real_client(url: str, index: int, model_dir: Path, data: Path,
                      order: list[asyncio.Event]) -> tuple[list[Any], list[Any], str]:
    """One device: register (in index order), then train and report ROUNDS rounds."""
    async with lab_device(url, index, model_dir, data, order) as device:
        client, joined, examples = device.client, device.joined, device.examples
        trainer = LocalTrainer(device.source, LOAD, joined.run,
                               build_task(examples, device.source, device.choice))
        assignments = []
        while len(assignments) < ROUNDS:
            answer = await client.next_round(trainer.table.version, wait_s=5)
            trainer.apply_deltas(answer.deltas)
            if answer.status != TRAIN:
                continue
            assert answer.assignment is not None
            outcome = await asyncio.to_thread(trainer.train_round, answer.assignment, threading.Event())
            await client.report(answer.assignment.round,
                                outcome.report(answer.assignment, f"real-{index}-{answer.assignment.round}"))
            assignments.append(answer.assignment)
        return examples, assignments, joined.token


async def test_a_simulated_run_equals_real_clients_on_a_real_server_bit_for_bit(
        tmp_path: Path, aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = make_world(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", signal_examples(90))
    sim = simulate(world.model_dir, data)

    ordered_ids(monkeypatch)
    url, _, results = await serve_lab_fleet(aiohttp_client, tmp_path / "db", RUN, real_client,
                                            world.model_dir, data)
    async with ServerClient(url, token=results[0][2]) as client:
        state = await client.state()

    virtual = [sim.clients[cid] for cid in sorted(sim.clients)]
    for (examples, assignments, _), client in zip(results, virtual, strict=True):
        assert examples == list(client.task.examples)  # the same shard
        assert [a.round for a in assignments] == [1, 2]
    assert [r.status for r in sim.records] == ["applied", "applied"]
    assert state.version == sim.engine.version == ROUNDS
    assert sim.engine.alpha is not None and np.count_nonzero(sim.engine.alpha) > 0
    assert state.matrix().astype("<f8").tobytes() == sim.engine.alpha.astype("<f8").tobytes()
