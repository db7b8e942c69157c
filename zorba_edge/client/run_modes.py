"""What a run mode is to this client: which trainer runs its rounds, and whether the device's
memory budget is kept. The server's side of each mode is zorba_server.modes; the names are
zorba_common.run_defaults.RUN_MODES (a RunInfo carrying another is refused when decoded).

The three zeroth-order modes differ only in which blocks the server assigns, so they share a
trainer; fedavg trains first-order and exchanges weights (zorba_edge/client/fedavg.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from zorba_common.messages import RunInfo
from zorba_common.run_defaults import FEDAVG, FEDZO_FULL, ZORBA, ZORBA_UNIFORM
from zorba_edge.client.daemon import Trainer
from zorba_edge.client.local_task import LocalTask
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.progress import Progress
from zorba_edge.model.sources import ModelSource


class MakeTrainer(Protocol):
    """(source, load config, run, task, saved table or None) -> a trainer holding its model;
    `progress` counts the model's loading (load_model's parts)."""

    def __call__(self, source: ModelSource, load_config: LoadConfig, run: RunInfo,
                 task: LocalTask, table: CoefficientTable | None,
                 progress: Progress | None = None) -> Trainer: ...


def zo_trainer(source: ModelSource, load_config: LoadConfig, run: RunInfo, task: LocalTask,
               table: CoefficientTable | None, progress: Progress | None = None) -> Trainer:
    from zorba_edge.client.trainer import LocalTrainer

    trainer = LocalTrainer(source, load_config, run, task, table=table)
    # Load the model now rather than inside the first round's deadline.
    trainer.hold((), progress)
    return trainer


def fedavg_trainer(source: ModelSource, load_config: LoadConfig, run: RunInfo, task: LocalTask,
                   table: CoefficientTable | None, progress: Progress | None = None) -> Trainer:
    from zorba_edge.client.fedavg import FedAvgTrainer

    trainer = FedAvgTrainer(source, load_config, run, task, table=table)
    trainer.hold(progress)
    return trainer


@dataclass(frozen=True)
class ClientMode:
    make_trainer: MakeTrainer
    keeps_budget: bool = True
    """False: every block trains whatever the budget (its peaks are what the baseline measures),
    so joining checks only the model."""


ZO = ClientMode(zo_trainer)
CLIENT_MODES: dict[str, ClientMode] = {
    ZORBA: ZO, ZORBA_UNIFORM: ZO, FEDZO_FULL: ZO,
    FEDAVG: ClientMode(fedavg_trainer, keeps_budget=False),
}
"""run.mode -> how this client trains it."""
