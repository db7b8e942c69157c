"""The label readout on a client's model: attached where the run measures one and the task is a
classification, its rows the base head's plus the table's column R (zorba_common.readout).

One function for every holder of a run's model (the client's trainer, the simulator, the
evaluation): the readout's tokens are the sorted unique ids of every label word's tokens, as
the collator renders them; its rows are rebuilt as every block's are (`materialize_block_`),
so a sync moves them with `apply_increments_` like any held block.
"""

from __future__ import annotations

import logging

from torch import nn

from zorba_common.messages import RunInfo
from zorba_common.readout import readout_block
from zorba_edge.client.local_task import CLASSIFICATION, LocalTask
from zorba_edge.data.templates import label_token_ids
from zorba_edge.engine.coefficients import CoefficientTable, materialize_block_
from zorba_edge.model.readout import LabelReadout, attach_readout

log = logging.getLogger("zorba_edge.client")

LM_TASK_MESSAGE = ("the run measures a label readout (readout_directions {n}), but this client's "
                   "task is a generation task, which has no label words: it trains its assigned "
                   "blocks and reports no readout scalars")


def readout_tokens(task: LocalTask) -> list[int]:
    """The sorted unique token ids of every label word of a classification task."""
    assert task.template is not None  # a classification task has one (LocalTask checks)
    return sorted({t for word in label_token_ids(task.tokenizer, task.template) for t in word})


def client_readout(model: nn.Module, run: RunInfo, task: LocalTask,
                   table: CoefficientTable) -> LabelReadout | None:
    """The readout attached to `model` with rows base + alpha[:, R], or None where the run
    measures none; a generation task says once why it measures none."""
    if run.hyper.readout_directions <= 0:
        return None
    if task.kind != CLASSIFICATION:
        log.warning(LM_TASK_MESSAGE.format(n=run.hyper.readout_directions))
        return None
    return table_readout(model, task, table, run.seed, run.num_blocks)


def table_readout(model: nn.Module, task: LocalTask, table: CoefficientTable, run_seed: int,
                  num_blocks: int) -> LabelReadout | None:
    """The readout a table's column R gives `model` (attached), or None where the table has no
    readout column or the task no label words: what an evaluation of base + alpha scores."""
    if table.num_blocks != num_blocks + 1 or task.kind != CLASSIFICATION:
        return None
    readout, _ = attach_readout(model, readout_tokens(task))
    block = readout_block(num_blocks)
    materialize_block_(readout.tensors(), run_seed, block, table.column(block))
    return readout


def rebuild_readout(readout: LabelReadout, model: nn.Module, run: RunInfo,
                    table: CoefficientTable) -> None:
    """The rows rebuilt from the base head's and the table's column R (after a catch-up)."""
    readout.reset_(model.get_output_embeddings())  # type: ignore[operator]
    block = readout_block(run.num_blocks)
    materialize_block_(readout.tensors(), run.seed, block, table.column(block))
