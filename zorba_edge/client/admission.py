"""The client's own admission check: does the run fit this device's budget at all?

It asks the same memory model and the same rule the registration and the scheduler use
(`zorba_common.memory_model`: the usable part of the budget holds the frozen model and a block),
so a client refuses to start exactly when the server could never give it a block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zorba_common.memory_model import (
    MEMORY_HEADROOM,
    MemorySettings,
    ModelFootprint,
    client_memory_bytes,
    linear_memory_model,
    usable_budget,
)
from zorba_edge.client.byte_sizes import format_size
from zorba_edge.client.errors import BudgetError

_SMALLER = {"fp32": "bf16", "fp16": "int8", "bf16": "int8", "int8": "nf4"}


@dataclass(frozen=True)
class Admission:
    """What the scheduler will see of this device."""

    budget_bytes: int
    fixed_bytes: int
    """Every block frozen, plus embeddings/head, activations and runtime."""
    block_bytes: tuple[int, ...]
    """Extra bytes to activate each block."""
    max_blocks: int
    """How many blocks (the cheapest first) fit the usable budget at once."""

    @property
    def num_blocks(self) -> int:
        return len(self.block_bytes)


def admit(footprint: ModelFootprint, settings: MemorySettings, budget_bytes: int) -> Admission:
    """The device's admission, or BudgetError saying what does not fit and what to change.

    The rule the server's registration and its scheduler use (`LinearMemoryModel.admits`):
    the usable part of the budget (all but MEMORY_HEADROOM) must hold the frozen model and a
    block. Judged on the whole budget, a client passed here and was then left out of every
    round by a scheduler planning with 95% of it (issue 27)."""
    model = linear_memory_model(footprint, settings)
    frozen = client_memory_bytes(footprint, settings, ())
    usable = usable_budget(budget_bytes)
    shape = f"batch_size={settings.batch_size}, seq_len={settings.seq_len}"
    smaller = _SMALLER.get(settings.frozen_dtype)
    hint = f", hold frozen blocks in {smaller} (--frozen-dtype {smaller})" if smaller else ""
    budget = (f"the memory budget is {format_size(budget_bytes)}, of which the scheduler fills "
              f"at most {format_size(usable)} ({1 - MEMORY_HEADROOM:.0%})")
    raise_it = f"--memory-budget {math.ceil(model.budget_needed() / 2**20)}MiB or more, if the device has it"
    max_blocks = model.blocks_within(usable)
    if max_blocks < 0:
        raise BudgetError(
            f"the model does not fit this device even with every block frozen: it needs "
            f"{format_size(frozen)} (frozen blocks in {settings.frozen_dtype}, {shape}) and "
            f"{budget}. Give it {raise_it}; or free memory{hint}, or use a smaller model"
        )
    if max_blocks == 0:
        cheapest = min(range(footprint.num_blocks), key=lambda b: model.block_bytes[b])
        need = client_memory_bytes(footprint, settings, (cheapest,))
        raise BudgetError(
            f"the frozen model fits ({format_size(frozen)}) but training even the cheapest block "
            f"needs {format_size(need)} ({settings.train_dtype} weights plus their snapshot, "
            f"{shape}) and {budget}. Give it {raise_it}; or free memory{hint}, or train in bf16 "
            "(--train-dtype bf16)"
        )
    return Admission(budget_bytes, model.fixed_bytes, model.block_bytes, max_blocks)
