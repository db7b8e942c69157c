"""A client's round with the label readout (issue 26): readout scalars per pool index, the rows
reverted with the blocks, deltas moving them, and a generation task told why it has none."""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np
import pytest
import torch
from fixtures_text import make_tokenizer
from test_trainer import HYPER, examples, make_trainer, state_of

from zorba_common.messages import AlphaDelta, Assignment
from zorba_common.readout import readout_block
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.readout_setup import client_readout, readout_tokens
from zorba_edge.client.trainer import LocalTrainer, ReadoutRound
from zorba_edge.data.examples import GenerationExample
from zorba_edge.engine.coefficients import CoefficientTable

READOUT = dataclasses.replace(HYPER, estimator="one-sided", directions=2, readout_directions=3,
                              readout_lr=0.05, trust_radius=0.03)


def readout_trainer() -> LocalTrainer:
    trainer = make_trainer()
    trainer.run = dataclasses.replace(trainer.run, hyper=READOUT)
    trainer.table = CoefficientTable(trainer.run.pool_size, trainer.run.num_blocks + 1)
    return trainer


def assignment(ks: tuple[int, ...], version: int = 0) -> Assignment:
    return Assignment(round=1, base_version=version, blocks=(0, 2), pool_indices=ks, hyper=READOUT,
                      deadline_in_s=60, deadline_unix=0)


def test_a_readout_round_reports_summed_scalars_and_reverts_the_rows() -> None:
    trainer = readout_trainer()
    trainer.hold((0, 2))
    assert trainer.readout is not None
    rows = trainer.readout.rows.detach().clone()
    before = {b: state_of(trainer, b) for b in range(3)}
    outcome = trainer.train_round(assignment((3, 9, 12, 40)), threading.Event())
    # Two batches of three readout directions over four pool indices: 3, 9, 12 then 40, 3, 9.
    assert [k for k, _ in outcome.readout_steps] == [3, 9, 12, 40]
    assert all(np.isfinite(g) and g != 0 for _, g in outcome.readout_steps)
    report = outcome.report(assignment((3, 9, 12, 40)), "key")
    assert report.readout_steps == outcome.readout_steps
    assert torch.equal(trainer.readout.rows.detach(), rows)  # reverted bit for bit
    for b in range(3):
        after = state_of(trainer, b)
        assert all(torch.equal(after[n], before[b][n]) for n in after), b


def test_the_readout_takes_the_pool_in_turn_and_no_index_twice_in_a_batch() -> None:
    trainer = readout_trainer()
    trainer.hold((0,))
    assert trainer.readout is not None
    round_ = ReadoutRound.of(trainer.readout, trainer.run, assignment((5, 6)))
    assert round_ is not None and round_.directions == 2  # capped at the pool's length
    assert round_.pool_indices(0) == [5, 6] and round_.pool_indices(1) == [5, 6]
    round_ = ReadoutRound.of(trainer.readout, trainer.run, assignment((5, 6, 7, 8)))
    assert round_ is not None
    assert [round_.pool_indices(t) for t in range(3)] == [[5, 6, 7], [8, 5, 6], [7, 8, 5]]


def test_deltas_move_the_rows_as_column_r() -> None:
    trainer = readout_trainer()
    trainer.hold((0,))
    assert trainer.readout is not None
    base = trainer.readout.rows.detach().clone()
    column = readout_block(trainer.run.num_blocks)
    trainer.apply_deltas([AlphaDelta.from_matrix(1, 1, (4, 7), (0, column),
                                                 np.array([[1e-3, 0.2], [0.0, -0.1]]))])
    moved = trainer.readout.rows.detach()
    assert not torch.equal(moved, base)
    # The same rows as a readout built from the table, as a newcomer (or a catch-up) builds it.
    fresh = client_readout(trainer.loaded.model, trainer.run, trainer.task, trainer.table)  # type: ignore[union-attr]
    assert fresh is not None
    torch.testing.assert_close(fresh.rows.detach(), moved, rtol=1e-6, atol=1e-7)


def test_a_generation_task_is_told_it_has_no_readout(caplog: pytest.LogCaptureFixture) -> None:
    trainer = readout_trainer()
    tokenizer = make_tokenizer()
    task = LocalTask([GenerationExample("a prompt", " a completion")], tokenizer)
    trainer.hold((0,))
    with caplog.at_level(logging.WARNING, logger="zorba_edge.client"):
        assert client_readout(trainer.loaded.model, trainer.run, task, trainer.table) is None  # type: ignore[union-attr]
    assert "generation task" in caplog.text and "no readout scalars" in caplog.text


def test_the_readout_holds_every_label_words_tokens() -> None:
    task = LocalTask(examples(4), make_tokenizer())
    tokens = readout_tokens(task)
    assert tokens == sorted(set(tokens)) and len(tokens) >= 2
