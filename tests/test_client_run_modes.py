"""The client's side of the run modes: every mode on the wire has a trainer here, and fedavg is
the one that trains first-order and does not keep the budget."""

from __future__ import annotations

import pytest
from fixtures_text import make_tokenizer
from test_trainer import HYPER, examples
from tiny_models import tiny_llama_config

from zorba_common.messages import RunInfo
from zorba_common.run_defaults import FEDAVG, RUN_MODES
from zorba_edge.client.fedavg import FedAvgTrainer
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.run_modes import CLIENT_MODES
from zorba_edge.client.trainer import LocalTrainer
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import RandomInitSource


def test_every_run_mode_on_the_wire_has_a_client_mode() -> None:
    assert set(CLIENT_MODES) == set(RUN_MODES)
    assert {m for m, c in CLIENT_MODES.items() if not c.keeps_budget} == {FEDAVG}


@pytest.mark.parametrize("mode", RUN_MODES)
def test_each_mode_builds_its_trainer_holding_the_model(mode: str) -> None:
    tokenizer = make_tokenizer()
    source = RandomInitSource(tiny_llama_config(num_layers=2, vocab=160), seed=1,
                              tokenizer=tokenizer)
    run = RunInfo(run_id="r", seed=5, pool_size=16, num_blocks=2,
                  model_fingerprint=source.fingerprint, hyper=HYPER, round_duration_s=60,
                  poll_timeout_s=10, max_abs_scalar=1e4, mode=mode)
    task = LocalTask(examples(8), tokenizer, seed=2)
    trainer = CLIENT_MODES[mode].make_trainer(source, LoadConfig(frozen_dtype="fp32"), run, task,
                                              None)
    assert type(trainer) is (FedAvgTrainer if mode == FEDAVG else LocalTrainer)
    assert isinstance(trainer, FedAvgTrainer | LocalTrainer)
    assert trainer.loaded is not None  # loaded now, not inside the first round's deadline
