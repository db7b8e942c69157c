"""The client's own admission check: does the run fit this device's budget at all, and does a
round's assignment (`AssignmentCheck`)?

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
from zorba_common.messages import Assignment, MemoryProfile
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


@dataclass(frozen=True)
class AssignmentCheck:
    """Whether this device can hold a round's assignment: the admission's rule (the usable part
    of the budget holds the model with the assignment's blocks trainable), asked of the blocks
    a server assigned before any of them is loaded.

    A correct server never assigns more: its scheduler plans each client within the same usable
    budget with the same memory model (times the client's calibration). A buggy or hostile one,
    or one whose memory model disagrees, can; loading the blocks would then take the device past
    the memory its owner gave. The protocol has no way to decline a round, so the client sits
    it out and says why.

    The calibration: the server plans with the model times a factor it learns from the peaks
    the client reports (zorba_server/calibration.py), which falls below 1 where the peaks came
    in under the model, and then it may assign more blocks than the model at 1 fits. Every
    calibration the server has held since it registered this client is at least the smallest
    peak / model ratio of the client's acknowledged reports, or 1 if that is larger (each
    update keeps it at or above the report's ratio, and a calibration above 1 decays only to
    1). Checking at that floor (`ClientState.memory_floor`) refuses nothing such a server
    plans, where checking at 1 refused its tight plans after a peak under the model, round
    after round (a round sat out reports no peak, so the server's calibration never moves).
    The usable part is the client's default (MEMORY_HEADROOM): a server run with a smaller
    run.memory_headroom may plan into the margin the client keeps, and those rounds are
    declined."""

    footprint: ModelFootprint
    memory: MemoryProfile
    budget_bytes: int

    def refusal(self, assignment: Assignment, calibration: float) -> str | None:
        """One line saying why this device cannot hold `assignment`'s blocks, None if it can
        (or if a block does not exist: the trainer's own check refuses those)."""
        settings = self.memory.settings(assignment.hyper.batch_size, assignment.hyper.seq_len,
                                        calibration)
        try:
            need = client_memory_bytes(self.footprint, settings, assignment.blocks)
        except ValueError:
            return None
        usable = usable_budget(self.budget_bytes)
        if need <= usable:
            return None
        fitting = linear_memory_model(self.footprint, settings).blocks_within(usable)
        return (f"blocks {list(assignment.blocks)} need {format_size(need)} ({need:,} bytes: "
                f"{len(set(assignment.blocks))} blocks trainable, batch {settings.batch_size} x "
                f"{settings.seq_len}, memory model x {calibration:.3g}), over the usable "
                f"{format_size(usable)} ({usable:,} bytes) of this device's "
                f"{format_size(self.budget_bytes)} budget, which holds {max(fitting, 0)} "
                f"blocks at once: not loading them, sitting the round out")

    def peak_ratio(self, assignment: Assignment, peak_bytes: int) -> float:
        """A round's measured peak over the uncalibrated model's memory for its blocks: the
        ratio the server's calibration learns from (zorba_server/calibration.py)."""
        settings = self.memory.settings(assignment.hyper.batch_size, assignment.hyper.seq_len)
        return peak_bytes / client_memory_bytes(self.footprint, settings, assignment.blocks)
