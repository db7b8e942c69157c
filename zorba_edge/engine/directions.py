"""Moving a block's parameters along its seeded direction: theta[b] += scale * z[k, b].

Every change the engine, the sync and the export make to a block is this one operation,
so they all agree on which element moves which way. With z in {-1, +1}, `scale * z` is
exact and each update is a single IEEE rounding, identical on every device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from zorba_edge.common.noise import block_direction

NamedTensors = Sequence[tuple[str, torch.Tensor]]
"""A block's full-precision tensors, names relative to the block (any order)."""

BlockTensors = Mapping[int, NamedTensors]
"""Block index -> that block's named tensors."""


@torch.no_grad()
def add_direction_(
    tensors: NamedTensors, run_seed: int, k: int, block: int, scale: float
) -> None:
    """In place: every tensor of `block` moves by `scale` times its slice of z[k, block]."""
    if scale == 0.0 or not tensors:
        return
    by_name = dict(tensors)
    shapes = [(name, tensor.shape) for name, tensor in tensors]
    first = next(iter(by_name.values()))
    for name, z in block_direction(run_seed, k, block, shapes, device=first.device, dtype=first.dtype):
        by_name[name].add_(z, alpha=scale)


def perturb_(blocks: BlockTensors, run_seed: int, k: int, scale: float) -> None:
    """theta[b] += scale * z[k, b] for every block b given."""
    for block, tensors in blocks.items():
        add_direction_(tensors, run_seed, k, block, scale)
