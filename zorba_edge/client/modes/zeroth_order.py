"""The zeroth-order modes' client (zorba, zorba_uniform, fedzo_full): they differ only in which
blocks the server assigns, so they share `LocalTrainer` and the daemon's default round."""

from __future__ import annotations

from zorba_common.messages import RunInfo
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.modes.client_mode import ClientMode, Trainer
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.progress import Progress
from zorba_edge.model.sources import ModelSource


def zo_trainer(source: ModelSource, load_config: LoadConfig, run: RunInfo, task: LocalTask,
               table: CoefficientTable | None, progress: Progress | None = None) -> Trainer:
    from zorba_edge.client.trainer import LocalTrainer

    trainer = LocalTrainer(source, load_config, run, task, table=table)
    # Load the model now rather than inside the first round's deadline.
    trainer.hold((), progress)
    return trainer


MODE = ClientMode(zo_trainer)
