"""The fedavg baseline's client: AdamW rounds, weight files in and out, and a real run."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from client_support import Proc, TinyWorld, free_port, make_world, server_toml, start_client, start_server
from fixtures_text import make_tokenizer
from safetensors.numpy import load_file
from safetensors.torch import load
from test_trainer import HYPER, examples
from tiny_models import tiny_llama_config

from zorba_common.messages import AlphaDelta, Assignment, RunInfo
from zorba_common.run_defaults import FEDAVG
from zorba_common.weight_files import tensor_key, version_path
from zorba_edge.client.fedavg import FedAvgTrainer
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.trainer import SyncError
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import RandomInitSource

BLOCKS = 3


def make_trainer(task_seed: int = 2) -> FedAvgTrainer:
    tokenizer = make_tokenizer()
    source = RandomInitSource(tiny_llama_config(num_layers=BLOCKS, vocab=160), seed=1,
                              tokenizer=tokenizer)
    run = RunInfo(run_id="r", seed=5, pool_size=64, num_blocks=BLOCKS,
                  model_fingerprint=source.fingerprint, hyper=HYPER, round_duration_s=60,
                  poll_timeout_s=10, max_abs_scalar=1e4, mode=FEDAVG)
    task = LocalTask(examples(32), tokenizer, seed=task_seed)
    return FedAvgTrainer(source, LoadConfig(frozen_dtype="fp32"), run, task)


def assignment(round_: int, steps: int, version: int = 0) -> Assignment:
    return Assignment(round=round_, base_version=version, blocks=tuple(range(BLOCKS)),
                      pool_indices=tuple(range(steps)), hyper=HYPER, deadline_in_s=60,
                      deadline_unix=0)


def block_state(trainer: FedAvgTrainer) -> dict[str, torch.Tensor]:
    assert trainer.loaded is not None
    return {tensor_key(b, n): p.detach().clone() for b in range(BLOCKS)
            for n, p in trainer.loaded.trainable_parameters(b)}


def empty_delta(version: int) -> AlphaDelta:
    return AlphaDelta.from_matrix(version, version, (), (), np.zeros((0, 0)))


def test_a_round_is_real_adamw_backprop_on_every_block_and_uploads_the_result() -> None:
    trainer = make_trainer()
    reference_model = copy.deepcopy(trainer.hold().model)
    reference_task = make_trainer().task  # the same seed: the same batches in the same order
    outcome = trainer.train_round(assignment(1, 3), threading.Event())
    assert outcome.steps == () and outcome.trained and outcome.num_samples == 12
    assert outcome.peak_memory_bytes > 0 and outcome.step_time_s > 0

    # The same three steps written out with torch: backward, AdamW, on the blocks only.
    params = [p for layer in reference_model.model.layers for p in layer.parameters()]
    for p in reference_model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=HYPER.lr)
    for _ in range(3):
        batch = reference_task.next_batch(HYPER.batch_size, HYPER.seq_len)
        reference_task.loss_fn(reference_model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    uploaded = load(outcome.upload)
    assert set(uploaded) == set(block_state(trainer))
    for b, layer in enumerate(reference_model.model.layers):
        for name, p in layer.named_parameters():
            torch.testing.assert_close(uploaded[tensor_key(b, name)], p.detach(), rtol=0, atol=1e-6)
    base = make_trainer().hold()
    moved = [not torch.equal(uploaded[tensor_key(b, n)], p) for b in range(BLOCKS)
             for n, p in base.trainable_parameters(b)]
    assert all(moved)  # every block trained, not just some
    embed = trainer.loaded.model.get_input_embeddings().weight
    assert torch.equal(embed, base.model.get_input_embeddings().weight)  # frozen in every mode


def test_installed_weights_are_the_servers_bit_for_bit_and_rounds_need_them() -> None:
    trained = make_trainer()
    upload = trained.train_round(assignment(1, 2), threading.Event()).upload
    other = make_trainer(task_seed=9)
    other.apply_deltas([empty_delta(1)])
    with pytest.raises(SyncError, match="download them first"):
        other.train_round(assignment(2, 1, version=1), threading.Event())
    assert other.weights_needed(assignment(2, 1, version=1))
    other.install_weights(bytearray(upload), 1)
    assert not other.weights_needed(assignment(2, 1, version=1))
    for name, value in block_state(other).items():
        assert torch.equal(value, load(upload)[name]), name
    assert other.train_round(assignment(2, 1, version=1), threading.Event()).trained


def test_a_failed_first_round_restarts_from_the_base_model() -> None:
    trainer = make_trainer()
    fresh = make_trainer()
    fresh.hold()
    base = block_state(fresh)
    trainer.train_round(assignment(1, 2), threading.Event())
    assert any(not torch.equal(v, base[k]) for k, v in block_state(trainer).items())
    # Round 1 was never applied (version still 0): round 2 starts from the base again.
    cancel = threading.Event()
    cancel.set()
    outcome = trainer.train_round(assignment(2, 2), cancel)
    assert not outcome.trained and outcome.upload is None
    assert all(torch.equal(v, base[k]) for k, v in block_state(trainer).items())


@pytest.mark.slow
def test_a_fedavg_federation_runs_end_to_end_with_real_processes(tmp_path: Path) -> None:
    world: TinyWorld = make_world(tmp_path)
    db = tmp_path / "server.sqlite3"
    config = server_toml(tmp_path / "server.toml", db, free_port(), mode="fedavg",
                         min_clients=2, min_reports=2, max_rounds=2, lr=1e-3,
                         keep_weight_versions=True)
    procs: list[Proc] = []
    try:
        server, url = start_server(tmp_path, config)
        procs.append(server)
        for i in range(2):
            procs.append(start_client(tmp_path, world, url, tmp_path / f"c{i}" / "state.json",
                                      "--num-clients", "2", "--client-index", str(i), name=f"c{i}"))
        for proc in procs[1:]:
            assert proc.wait(120) == 0, proc.output()
            assert "fedavg baseline" in proc.output()
            assert proc.output().count("reported") >= 2
    finally:
        for proc in procs:
            proc.stop()
    weights_dir = Path(f"{db}.weights")
    first, second = (load_file(str(version_path(weights_dir, v))) for v in (1, 2))
    assert set(first) == set(second) and len(first) > 0
    assert any(not np.array_equal(first[k], second[k]) for k in first)  # round 2 trained on
