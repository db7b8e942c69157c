"""The coefficient table alpha (K x B): the whole fine-tuned state of a run (docs/design.md §1).

    theta[b] = theta0[b] - sum_k alpha[k, b] * z[k, b]

Clients keep their trainable blocks in step with the table by applying increments
(`apply_increments_`), and rebuild any block from its base weights plus the table's
column (`materialize_block_`) when an assignment changes, a frozen block is refreshed or
a checkpoint is exported. Both go through `move_`, the one update primitive.

The two give the same weights up to fp32 rounding, not bit for bit: the in-place path adds
each round's increment on its own, the rebuild adds each pool index's sum at once. Where
bits must agree with a model that followed every round in place (zorba_sim, a Flower node
served by any process), a block is built by `replay_block_materializer` instead: base, then
every round's increments in version order, the in-place path's own operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zorba_common.errors import AssignmentError, InvalidScalarError
from zorba_edge.engine.directions import BlockTensors, Direction, NamedTensors, Term, move_


@dataclass(frozen=True)
class AlphaIncrement:
    """alpha[k, block] += delta."""

    k: int
    block: int
    delta: float


class CoefficientTable:
    """alpha as a dense K x B float64 array with a version that counts applied updates."""

    def __init__(self, pool_size: int, num_blocks: int, values: np.ndarray | None = None,
                 version: int = 0) -> None:
        if pool_size < 1 or num_blocks < 1:
            raise ValueError(
                f"a table needs pool_size >= 1 and num_blocks >= 1, got {pool_size} x {num_blocks}")
        if values is None:
            values = np.zeros((pool_size, num_blocks), dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (pool_size, num_blocks):
            raise ValueError(f"values have shape {values.shape}, expected {(pool_size, num_blocks)}")
        if not np.isfinite(values).all():
            raise InvalidScalarError("the coefficient table holds NaN or infinite entries")
        self.values = values.copy()
        self.version = version

    @property
    def pool_size(self) -> int:
        return self.values.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.values.shape[1]

    def validate(self, increments: Iterable[AlphaIncrement]) -> list[AlphaIncrement]:
        """All increments, checked before any is applied (a bad batch changes nothing)."""
        checked = list(increments)
        for inc in checked:
            if not 0 <= inc.k < self.pool_size:
                raise AssignmentError(f"pool index {inc.k} is outside the pool of {self.pool_size} seeds")
            if not 0 <= inc.block < self.num_blocks:
                raise AssignmentError(
                    f"block {inc.block} does not exist: the model has {self.num_blocks} blocks")
            if not math.isfinite(inc.delta):
                raise InvalidScalarError(f"increment for (k={inc.k}, block={inc.block}) is {inc.delta}")
        return checked

    def apply(self, increments: Iterable[AlphaIncrement]) -> None:
        for inc in self.validate(increments):
            self.values[inc.k, inc.block] += inc.delta
        self.version += 1

    def column(self, block: int) -> list[tuple[int, float]]:
        """Block `block`'s non-zero (k, alpha) pairs in ascending k: the order every rebuild uses."""
        if not 0 <= block < self.num_blocks:
            raise AssignmentError(f"block {block} does not exist: the model has {self.num_blocks} blocks")
        col = self.values[:, block]
        return [(int(k), float(col[k])) for k in np.flatnonzero(col)]


SYNC_TERMS = 8
"""Increments of one block applied in one pass over its weights (`move_`): each is still its
own rounding in its order, so the bits are those of one pass per increment; their directions
are hashed for that pass only, 1/8 byte a parameter each."""


def apply_increments_(
    blocks: BlockTensors, run_seed: int, increments: Iterable[AlphaIncrement]
) -> None:
    """Sync: theta[b] -= delta * z[k, b] for each increment whose block is held here, in the
    given order within each block (blocks share no weights, so their order is free)."""
    by_block: dict[int, list[tuple[int, float]]] = {}
    for inc in increments:
        if inc.block in blocks:
            by_block.setdefault(inc.block, []).append((inc.k, inc.delta))
    for block, column in by_block.items():
        materialize_block_(blocks[block], run_seed, block, column)


def materialize_block_(
    tensors: NamedTensors, run_seed: int, block: int, column: Iterable[tuple[int, float]]
) -> None:
    """In place: base weights of `block` become base - sum_k alpha[k, block] z[k, block], one
    fp32 rounding per (k, alpha) in the given order (`SYNC_TERMS` of them a pass)."""
    if not tensors:
        return
    pairs = list(column)
    for first in range(0, len(pairs), SYNC_TERMS):
        move_([Term(-alpha, Direction({block: tensors}, run_seed, k, held=False))
               for k, alpha in pairs[first:first + SYNC_TERMS]])


def block_materializer(
    base_state_dict: Callable[[int], Mapping[str, torch.Tensor]],
    table: CoefficientTable,
    run_seed: int,
) -> Callable[[int], dict[str, torch.Tensor]]:
    """A function block -> fp32 state dict of base + alpha, for loading and re-assignment."""

    def materialize(block: int) -> dict[str, torch.Tensor]:
        state = {name: tensor.to(torch.float32, copy=True) for name, tensor in base_state_dict(block).items()}
        materialize_block_(list(state.items()), run_seed, block, table.column(block))
        return state

    return materialize


def replay_block_materializer(
    base_state_dict: Callable[[int], Mapping[str, torch.Tensor]],
    rounds: Sequence[Sequence[AlphaIncrement]],
    run_seed: int,
) -> Callable[[int], dict[str, torch.Tensor]]:
    """A function block -> fp32 state dict of base with every round's increments applied in
    place, round after round (`rounds` in version order): bit for bit the weights of a block
    loaded from base at version 0 that `apply_increments_` then moved through each round.
    Costs every round's entries for the block (a rebuild from the table: its column's)."""

    def materialize(block: int) -> dict[str, torch.Tensor]:
        state = {name: tensor.to(torch.float32, copy=True) for name, tensor in base_state_dict(block).items()}
        held = {block: list(state.items())}
        for increments in rounds:
            apply_increments_(held, run_seed, increments)
        return state

    return materialize
