"""The client's side of the run modes: every mode on the wire has a trainer here, and fedavg is
the one that trains first-order, exchanges weights around the daemon's round (its hooks) and
does not keep the budget; the zeroth-order modes' hooks do nothing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, cast

import pytest
from fixtures_text import make_tokenizer
from test_trainer import HYPER, examples
from tiny_models import tiny_llama_config

from zorba_common.messages import RunInfo
from zorba_common.run_defaults import FEDAVG, RUN_MODES
from zorba_edge.client import daemon
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.modes import CLIENT_MODES
from zorba_edge.client.modes.client_mode import RoundHooks
from zorba_edge.client.modes.fedavg import INITIAL_UPLOAD_S, WeightRounds
from zorba_edge.client.modes.fedavg_training import FORWARDS_PER_STEP, FedAvgTrainer
from zorba_edge.client.trainer import LocalTrainer, SyncError
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.engine.zo import forwards_per_step
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import RandomInitSource


def test_every_run_mode_on_the_wire_has_a_client_mode() -> None:
    assert set(CLIENT_MODES) == set(RUN_MODES)
    assert {m for m, c in CLIENT_MODES.items() if not c.keeps_budget} == {FEDAVG}


LOAD = LoadConfig(frozen_dtype="fp32")


def world(mode: str = RUN_MODES[0]) -> tuple[RandomInitSource, RunInfo, LocalTask]:
    """A tiny 2-block model, a run of `mode` on it, and a local task."""
    tokenizer = make_tokenizer()
    source = RandomInitSource(tiny_llama_config(num_layers=2, vocab=160), seed=1,
                              tokenizer=tokenizer)
    run = RunInfo(run_id="r", seed=5, pool_size=16, num_blocks=2,
                  model_fingerprint=source.fingerprint, hyper=HYPER, round_duration_s=60,
                  poll_timeout_s=10, max_abs_scalar=1e4, mode=mode)
    return source, run, LocalTask(examples(8), tokenizer, seed=2)


@pytest.mark.parametrize("mode", RUN_MODES)
def test_each_mode_builds_its_trainer_holding_the_model(mode: str) -> None:
    source, run, task = world(mode)
    trainer = CLIENT_MODES[mode].make_trainer(source, LOAD, run, task, None)
    assert type(trainer) is (FedAvgTrainer if mode == FEDAVG else LocalTrainer)
    assert isinstance(trainer, FedAvgTrainer | LocalTrainer)
    assert trainer.loaded is not None  # loaded now, not inside the first round's deadline
    hooks = CLIENT_MODES[mode].round_hooks(trainer)
    if mode == FEDAVG:
        assert isinstance(hooks, WeightRounds) and hooks.trainer is trainer
        assert hooks.upload_s() == INITIAL_UPLOAD_S  # kept free before any upload was timed
        assert hooks.step_forwards(HYPER) == FORWARDS_PER_STEP
    else:
        assert type(hooks) is RoundHooks and hooks.upload_s() == 0.0
        assert hooks.step_forwards(HYPER) == forwards_per_step(HYPER.estimator, HYPER.directions)


def test_the_zeroth_order_rounds_fetch_and_upload_nothing() -> None:
    hooks = RoundHooks()
    io: Any = object()  # any use of the daemon would fail
    assignment: Any = object()
    assert asyncio.run(hooks.before_training(assignment, io)) is True
    assert asyncio.run(hooks.after_training(assignment, cast(Any, None), io)) is None


def test_fedavg_refuses_a_trainer_that_cannot_exchange_weights() -> None:
    with pytest.raises(TypeError, match="exchanges weights"):
        CLIENT_MODES[FEDAVG].round_hooks(cast(Any, object()))


def test_the_daemon_does_not_know_any_run_mode() -> None:
    source = Path(daemon.__file__).read_text()
    assert not re.search(r"fedavg|weights?_|WeightExchange|isinstance", source, re.IGNORECASE)


@pytest.mark.parametrize("trainer_class", [LocalTrainer, FedAvgTrainer])
def test_every_trainer_resumes_a_saved_table_of_the_runs_shape_only(trainer_class: Any) -> None:
    source, run, task = world()
    fresh = trainer_class(source, LOAD, run, task)
    assert (fresh.table.pool_size, fresh.table.num_blocks, fresh.table.version) == (16, 2, 0)
    saved = CoefficientTable(16, 2, version=3)
    assert trainer_class(source, LOAD, run, task, table=saved).table is saved
    with pytest.raises(SyncError, match="the saved table is 8 x 2 but the run's is 16 x 2"):
        trainer_class(source, LOAD, run, task, table=CoefficientTable(8, 2))
