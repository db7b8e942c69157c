"""Replaying a run's record: per-version weights and held-out accuracy after the fact.

The record is written through the server's own `Store` (zorba_server.storage), as the server
writes it, and the replay reads it back through the same protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_text import make_tokenizer
from safetensors.numpy import save_file
from server_fakes import FOOTPRINT
from tiny_models import tiny_llama_config

from zorba_common.messages import AlphaDelta, HyperParams
from zorba_common.weight_files import default_weights_dir, tensor_key, version_path
from zorba_edge.client.local_task import LocalTask
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.engine.coefficients import AlphaIncrement, CoefficientTable, block_materializer
from zorba_edge.engine.losses import evaluate_classification
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.sources import RandomInitSource
from zorba_lab.replay import (
    ReplayError,
    load_replay_model,
    replay,
    replay_versions,
    selected_versions,
)
from zorba_server.rounds import ClientPlan, RoundPlan
from zorba_server.storage import SqliteStore

SEED, POOL, BLOCKS = 5, 16, 3
HYPER = HyperParams(lr=1e-3, mu=1e-3, batch_size=4, seq_len=16)
# (round, applied?, closed_at): round 2 failed, so versions 1, 2, 3 come from rounds 1, 3, 4.
ROUNDS = ((1, True, 110.0), (2, False, 125.0), (3, True, 140.0), (4, True, 170.0))


def make_source() -> RandomInitSource:
    config = tiny_llama_config(num_layers=BLOCKS, vocab=160)
    return RandomInitSource(config, seed=1, tokenizer=make_tokenizer())


def heldout_batches(source: RandomInitSource) -> list:
    rng = np.random.default_rng(0)
    words = {0: "terrible bad boring".split(), 1: "great good fun".split()}
    examples = []
    for _ in range(24):
        label = int(rng.integers(2))
        examples.append(ClassificationExample(" ".join(rng.choice(words[label], 3)) + " movie", label))
    return list(LocalTask(examples, source.tokenizer()).batches(8, 16))


def random_delta(version: int, round_: int) -> AlphaDelta:
    rng = np.random.default_rng(version)
    ks = tuple(sorted(rng.choice(POOL, 4, replace=False).tolist()))
    blocks = (0, 2) if version == 2 else tuple(range(BLOCKS))  # not every block every round
    values = rng.normal(0, 2e-3, (len(ks), len(blocks)))
    return AlphaDelta.from_matrix(version, round_, ks, blocks, values)


def empty_delta(version: int, round_: int) -> AlphaDelta:
    """What a fedavg round records: its training travels as weights, alpha stays zero."""
    return AlphaDelta.from_matrix(version, round_, (), (), np.zeros((0, 0)))


def write_record(db_path: Path, make_delta) -> list[AlphaDelta]:
    return asyncio.run(_write_record(db_path, make_delta))


async def _write_record(db_path: Path, make_delta) -> list[AlphaDelta]:
    store = await SqliteStore.open(db_path)
    await store.create_run("run-1", SEED, POOL, created_at=90.0)
    alpha = np.zeros((POOL, BLOCKS))
    # As a server writes it: the model pinned, the table the sum of the increments (a store
    # refuses a table that is not: zorba_server/storage/integrity.py).
    await store.pin_model("fp", dataclasses.replace(
        FOOTPRINT, block_params=(1000,) * BLOCKS, quantizable_block_params=(900,) * BLOCKS,
        num_layers=BLOCKS), alpha)
    deltas: list[AlphaDelta] = []
    for round_, applied, closed_at in ROUNDS:
        plan = RoundPlan(round_, len(deltas), opened_at=closed_at - 10.0, deadline=closed_at,
                         hyper=HYPER, pool_indices=(1, 2), clients={"c": ClientPlan((0,), 2)})
        await store.insert_round(plan)
        if applied:
            deltas.append(make_delta(len(deltas) + 1, round_))
            d = deltas[-1]
            alpha = alpha.copy()
            if d.pool_indices:
                alpha[np.ix_(d.pool_indices, d.blocks)] += d.matrix().astype(np.float64)
            await store.close_round(round_, "applied", closed_at, 1, 0.5, "", delta=deltas[-1],
                                    alpha=alpha)
        else:
            await store.close_round(round_, "failed", closed_at, 0, None, "too few reports")
    await store.close()
    return deltas


def materialized(source: RandomInitSource, deltas: list[AlphaDelta]) -> dict[int, dict]:
    """Every block from base + the whole table: how export and clients rebuild a block."""
    table = CoefficientTable(POOL, BLOCKS)
    for d in deltas:
        table.apply([AlphaIncrement(k, b, v) for k, b, v in d.entries()])
    materialize = block_materializer(source.block_state_dict, table, SEED)
    return {b: materialize(b) for b in range(BLOCKS)}


def block_weights(loaded) -> dict[int, dict[str, torch.Tensor]]:
    return {b: {n: p.detach().clone() for n, p in loaded.trainable_parameters(b)}
            for b in range(BLOCKS)}


def test_zo_replay_reaches_base_plus_table_at_every_version(tmp_path: Path) -> None:
    source = make_source()
    deltas = write_record(tmp_path / "server.sqlite3", random_delta)
    loaded = load_replay_model(source)
    base = block_weights(loaded)
    seen = []
    for applied in replay_versions(loaded, tmp_path / "server.sqlite3", "zorba"):
        seen.append((applied.version, applied.round, applied.closed_at))
        expected = materialized(source, deltas[: applied.version])
        for b, weights in block_weights(loaded).items():
            for name, tensor in weights.items():
                torch.testing.assert_close(tensor, expected[b][name], rtol=0, atol=1e-6)
    assert seen == [(1, 1, 110.0), (2, 3, 140.0), (3, 4, 170.0)]
    # The deltas really moved the weights (the comparison above is not base vs base).
    moved = max(float((block_weights(loaded)[b][n] - base[b][n]).abs().max())
                for b in range(BLOCKS) for n in base[b])
    assert moved > 1e-3


def test_replay_scores_the_base_and_each_chosen_version_like_a_fresh_model(tmp_path: Path) -> None:
    source = make_source()
    db = tmp_path / "server.sqlite3"
    deltas = write_record(db, random_delta)
    batches = heldout_batches(source)
    result = replay(db, "fedzo-full", source, batches, every=2)
    assert [(p.version, p.round, p.closed_at) for p in result.points] == [
        (0, 0, None), (2, 3, 140.0), (3, 4, 170.0)]  # every 2nd, and always the last
    fp32 = LoadConfig(train_dtype="fp32", frozen_dtype="fp32")
    base = evaluate_classification(load_model(source, (), fp32).model, batches)
    table = materialized(source, deltas)
    final = evaluate_classification(load_model(source, (), fp32, materialize=table.get).model,
                                    batches)
    first, last = result.points[0], result.points[-1]
    assert (first.accuracy, last.accuracy) == (base.accuracy, final.accuracy)
    assert first.loss == pytest.approx(base.loss, abs=1e-6)
    assert last.loss == pytest.approx(final.loss, abs=1e-5)
    assert abs(last.loss - first.loss) > 1e-5  # version 3 is not the base model
    assert result.load_s > 0 and all(p.eval_s > 0 for p in result.points)


def test_fedavg_replay_copies_each_versions_weight_file(tmp_path: Path) -> None:
    source = make_source()
    db = tmp_path / "server.sqlite3"
    write_record(db, empty_delta)
    loaded = load_replay_model(source)
    shapes = {(b, n): tuple(p.shape) for b in range(BLOCKS) for n, p in loaded.trainable_parameters(b)}
    files = {}
    directory = default_weights_dir(db)
    directory.mkdir()
    for version in (1, 2, 3):
        rng = np.random.default_rng(version)
        files[version] = {tensor_key(b, n): rng.normal(0, 0.02, shape).astype(np.float32)
                          for (b, n), shape in shapes.items()}
        save_file(files[version], str(version_path(directory, version)))
    for applied in replay_versions(loaded, db, "fedavg"):
        for b in range(BLOCKS):
            for name, param in loaded.trainable_parameters(b):
                np.testing.assert_array_equal(param.detach().numpy(),
                                              files[applied.version][tensor_key(b, name)])
    assert applied.version == 3

    version_path(directory, 2).unlink()
    with pytest.raises(ReplayError, match=r"global-v000002\.safetensors.*keep_weight_versions"):
        list(replay_versions(load_replay_model(source), db, "fedavg"))


def test_a_weight_file_missing_a_parameter_is_refused(tmp_path: Path) -> None:
    source = make_source()
    db = tmp_path / "server.sqlite3"
    write_record(db, empty_delta)
    loaded = load_replay_model(source)
    directory = default_weights_dir(db)
    directory.mkdir()
    partial = {tensor_key(b, n): p.detach().numpy().copy() for b in range(BLOCKS)
               for n, p in loaded.trainable_parameters(b) if b != 1}
    save_file(partial, str(version_path(directory, 1)))
    with pytest.raises(ReplayError, match=r"lacks .* blocks\.1\."):
        next(replay_versions(loaded, db, "fedavg"))


def test_selected_versions_are_the_base_every_nth_and_the_last() -> None:
    assert selected_versions(7, 3) == {0, 3, 6, 7}
    assert selected_versions(4, 1) == {0, 1, 2, 3, 4}
    assert selected_versions(0, 5) == {0}
    with pytest.raises(ValueError):
        selected_versions(3, 0)
