"""The fedavg baseline's client (issue 5): first-order AdamW on every block
(`fedavg_training.py`), weights exchanged both ways, the budget reported against, not kept.

Its round, around the daemon's: before training, download the round's base weights when the
trainer lacks them (GET /v1/weights); after it, PUT the trained weights before the report
(the server averages the files, zorba_server/weight_rounds.py). The step budget keeps twice
the last upload's time free, and a first-order step is judged as FORWARDS_PER_STEP forwards.
The server's side is zorba_server/modes/fedavg.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, runtime_checkable

from zorba_common.messages import Assignment, HyperParams, RunInfo
from zorba_edge.client.byte_sizes import format_size
from zorba_edge.client.errors import ServerRefusedError
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.modes.client_mode import ClientMode, RoundHooks, RoundIO, Trainer
from zorba_edge.client.modes.fedavg_training import FORWARDS_PER_STEP, FedAvgTrainer
from zorba_edge.client.trainer import LocalRoundResult
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.progress import Progress
from zorba_edge.model.sources import ModelSource

log = logging.getLogger("zorba_edge.client")

INITIAL_UPLOAD_S = 5.0
"""Assumed weight-upload time before one was measured."""


@runtime_checkable
class WeightExchange(Protocol):
    """A trainer whose rounds start from downloaded weights (`FedAvgTrainer`)."""

    def weights_needed(self, assignment: Assignment) -> bool: ...

    def install_weights(self, buffer: bytearray, version: int) -> None: ...


def fedavg_trainer(source: ModelSource, load_config: LoadConfig, run: RunInfo, task: LocalTask,
                   table: CoefficientTable | None, progress: Progress | None = None) -> Trainer:
    trainer = FedAvgTrainer(source, load_config, run, task, table=table)
    trainer.hold(progress)
    return trainer


class WeightRounds(RoundHooks):
    """The daemon's fedavg round: weights down before training, up after it."""

    def __init__(self, trainer: WeightExchange) -> None:
        self.trainer = trainer
        self._upload_s = INITIAL_UPLOAD_S
        """How long the last weight upload took."""

    def upload_s(self) -> float:
        return self._upload_s

    def step_forwards(self, hyper: HyperParams) -> float:
        return FORWARDS_PER_STEP

    async def before_training(self, assignment: Assignment, io: RoundIO) -> bool:
        """Download the round's base weights when the trainer lacks them; False: skip."""
        if not self.trainer.weights_needed(assignment):
            return True
        io.on_status(f"downloading the weights of version {assignment.base_version}")
        try:
            got = await io.until_stop(io.client.weights())
        except ServerRefusedError as exc:
            log.error("round %d: the weights download was refused: %s", assignment.round, exc)
            return False
        if got is None:
            return False
        buffer, version = got
        if version != assignment.base_version:
            log.warning("round %d trains on version %d but the server now serves %d: sitting "
                        "it out", assignment.round, assignment.base_version, version)
            return False
        await asyncio.to_thread(self.trainer.install_weights, buffer, version)
        return True

    async def after_training(self, assignment: Assignment, outcome: LocalRoundResult,
                             io: RoundIO) -> str | None:
        """PUT the trained weights before the report; None when accepted."""
        if outcome.upload is None:
            return None
        round_, body = assignment.round, outcome.upload
        io.on_status(f"uploading {format_size(len(body))} of weights for round {round_}")
        started = asyncio.get_running_loop().time()
        try:
            done = await io.until_stop(io.client.upload_weights(round_, body))
        except ServerRefusedError as exc:
            if exc.status == 401:
                raise
            if exc.code in ("round_closed", "unknown_round"):
                log.warning("round %d closed before the weights arrived", round_)
                return "late"
            log.error("round %d: weights refused: %s", round_, exc)
            return "refused"
        if done is None:
            return "abandoned"
        self._upload_s = asyncio.get_running_loop().time() - started
        return None


def weight_rounds(trainer: Trainer) -> RoundHooks:
    if not isinstance(trainer, WeightExchange):
        raise TypeError(f"the fedavg mode needs a trainer that exchanges weights, not {trainer!r}")
    return WeightRounds(trainer)


MODE = ClientMode(fedavg_trainer, weight_rounds, keeps_budget=False)
