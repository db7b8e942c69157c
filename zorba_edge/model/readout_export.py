"""The label readout in an export: an untied output head carrying the trained label rows.

A run with a label readout moves the LM head's rows of the label tokens (column R of the table,
zorba_common.readout) and nothing else of the head; the input embeddings of a model whose head
is tied to them keep their base weights (zorba_edge/model/readout.py). An exported model
reproduces that with an untied head: the base head (or the tied embedding) with the label rows
replaced (`LabelReadout.head_weight`). Which rows those are is the task's (its label words'
tokens), which the table does not hold: the export is given them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zorba_common.errors import ModelSourceError
from zorba_common.readout import readout_block
from zorba_edge.engine.coefficients import CoefficientTable, materialize_block_
from zorba_edge.model.readout import LabelReadout
from zorba_edge.model.skeleton import build_skeleton
from zorba_edge.model.sources import ModelSource


@dataclass(frozen=True)
class ExportedHead:
    name: str
    """The head's parameter name (e.g. lm_head.weight)."""
    weight: torch.Tensor
    """(vocab, hidden) fp32: the base head with the readout's rows."""
    was_tied: bool
    """The base model's head was its input embedding: the export unties it."""


def body_blocks(table: CoefficientTable, num_blocks: int | None) -> int:
    """The model's blocks, checked against the table: num_blocks columns, or one more for the
    label readout's."""
    if num_blocks is None or table.num_blocks not in (num_blocks, num_blocks + 1):
        raise ModelSourceError(
            f"the coefficient table has {table.num_blocks} blocks but the model has {num_blocks}: "
            "is this the run's base model?")
    return num_blocks


def readout_head(source: ModelSource, table: CoefficientTable, run_seed: int, num_blocks: int,
                 readout_tokens: Sequence[int] | None) -> ExportedHead | None:
    """The untied head an export writes where the table moved the readout (None: it did not,
    or the run has none)."""
    if table.num_blocks != num_blocks + 1:
        return None
    block = readout_block(num_blocks)
    column = table.column(block)
    if not column:
        return None
    if not readout_tokens:
        raise ModelSourceError(
            f"the coefficient table has {table.num_blocks} blocks but the model has {num_blocks}: "
            "either this is not the run's base model, or the run trained the label readout (the "
            "head's rows of the label tokens, one more column): then give the task's label words "
            "(--labels / --label-words, as `run` was given them) so the export knows its rows")
    skeleton = build_skeleton(source.config)
    names = {id(m): name for name, m in skeleton.named_modules()}
    head = skeleton.get_output_embeddings()
    embeddings = skeleton.get_input_embeddings()
    head_name = f"{names[id(head)]}.weight"
    state = source.non_block_state_dict()
    was_tied = head_name not in state
    weight = state[f"{names[id(embeddings)]}.weight" if was_tied else head_name].to(torch.float32)
    holder = nn.Module()  # the readout reads `weight` (and no bias) from its head
    holder.weight = nn.Parameter(weight, requires_grad=False)
    readout = LabelReadout(holder, readout_tokens)
    materialize_block_(readout.tensors(), run_seed, block, column)
    return ExportedHead(head_name, readout.head_weight(weight), was_tied)
