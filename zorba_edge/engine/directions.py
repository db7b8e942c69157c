"""Moving a block's parameters along its seeded direction: theta[b] += scale * z[k, b].

Every change the engine, the sync and the export make to a block is this one operation,
so they all agree on which element moves which way. With z in {-1, +1}, `scale * z` is
exact and each update is a single IEEE rounding, identical on every device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
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
    """In place: every tensor of `block` moves by `scale` times its slice of z[k, block].

    The step is computed in fp32 whatever the tensor's dtype, with `scale` rounded to fp32
    first: `theta + scale * z` is then one fp32 rounding (plus one to a narrower dtype),
    the same on every device. Left to each backend, bf16 arithmetic differs by an ulp
    between CPU and CUDA (measured on an H100: 538 of 700,000 elements after one update).
    """
    if scale == 0.0 or not tensors:
        return
    scale = float(np.float32(scale))
    by_name = dict(tensors)
    shapes = [(name, tensor.shape) for name, tensor in tensors]
    device = next(iter(by_name.values())).device
    for name, z in block_direction(run_seed, k, block, shapes, device=device, dtype=torch.float32):
        tensor = by_name[name]
        if tensor.dtype == torch.float32:
            tensor.add_(z, alpha=scale)
        else:
            tensor.copy_(tensor.float().add_(z, alpha=scale))


def perturb_(blocks: BlockTensors, run_seed: int, k: int, scale: float) -> None:
    """theta[b] += scale * z[k, b] for every block b given."""
    for block, tensors in blocks.items():
        add_direction_(tensors, run_seed, k, block, scale)
