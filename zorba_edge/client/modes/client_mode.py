"""What a run mode is to this client: which trainer runs its rounds, what the daemon does around
each round (its hooks), and whether the device's memory budget is kept.

The daemon (zorba_edge/client/daemon.py) polls, syncs, trains and reports the same way in every
mode and calls a mode's `RoundHooks` at the points where modes differ; the defaults are the
zeroth-order modes' (nothing to download or upload, a step costs its estimator's forwards).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from zorba_common.messages import AlphaDelta, AlphaState, Assignment, HyperParams, RunInfo
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.trainer import LocalRoundResult, StepGate
from zorba_edge.client.transport import ServerClient
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.engine.zo import forwards_per_step
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.progress import Progress
from zorba_edge.model.sources import ModelSource

T = TypeVar("T")


class Trainer(Protocol):
    """What the daemon needs of a mode's trainer (`LocalTrainer`, zorba_edge/client/trainer.py)."""

    table: CoefficientTable

    def apply_deltas(self, deltas: Iterable[AlphaDelta],
                     progress: Progress | None = None) -> None: ...

    def replace_table(self, state: AlphaState, progress: Progress | None = None) -> None: ...

    def train_round(self, assignment: Assignment, cancel: threading.Event,
                    on_step: StepGate | None = None) -> LocalRoundResult: ...


class RoundIO(Protocol):
    """What a mode's round hooks may use of the daemon: its transport, its status line, and
    its stop (an awaitable it cancels when a stop comes first, returning None)."""

    @property
    def client(self) -> ServerClient: ...

    def on_status(self, text: str) -> None: ...

    async def until_stop(self, awaitable: Awaitable[T]) -> T | None: ...


class RoundHooks:
    """A mode's part of one round, around the daemon's own; these defaults do nothing."""

    def upload_s(self) -> float:
        """Seconds the upload after training is expected to take: the step budget keeps twice
        this free before the deadline (0: nothing is uploaded)."""
        return 0.0

    def step_forwards(self, hyper: HyperParams) -> float:
        """A local step's cost in forward passes, to judge the first round's steps by the
        timing probe's forward (a zeroth-order step is its estimator's forwards)."""
        return forwards_per_step(hyper.estimator, hyper.directions)

    async def before_training(self, assignment: Assignment, io: RoundIO) -> bool:
        """Ready the trainer for `assignment`; False: sit the round out."""
        return True

    async def after_training(self, assignment: Assignment, outcome: LocalRoundResult,
                             io: RoundIO) -> str | None:
        """Before the report is posted; None: post it, else the round ends with that status
        (`late`, `refused`, `abandoned`). A 401 refusal may propagate: the daemon rejoins."""
        return None


class MakeTrainer(Protocol):
    """(source, load config, run, task, saved table or None) -> a trainer holding its model;
    `progress` counts the model's loading (load_model's parts)."""

    def __call__(self, source: ModelSource, load_config: LoadConfig, run: RunInfo,
                 task: LocalTask, table: CoefficientTable | None,
                 progress: Progress | None = None) -> Trainer: ...


def no_hooks(trainer: Trainer) -> RoundHooks:
    return RoundHooks()


@dataclass(frozen=True)
class ClientMode:
    make_trainer: MakeTrainer
    round_hooks: Callable[[Trainer], RoundHooks] = no_hooks
    """(the trainer make_trainer built) -> the daemon's hooks for its rounds, one per trainer."""
    keeps_budget: bool = True
    """False: every block trains whatever the budget (its peaks are what the baseline measures),
    so joining checks only the model."""
