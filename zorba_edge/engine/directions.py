"""Moving a block's parameters along its seeded direction: theta[b] += scale * z[k, b].

Every change the engine, the sync and the export make to a block is this one operation,
so they all agree on which element moves which way. With z in {-1, +1}, `scale * z` is
exact and each update is a single IEEE rounding, identical on every device.

A `Direction` hashes z[k] once and keeps it packed, one bit per parameter (d / 8 bytes:
440 KB for a 3.5M-parameter block, 13 MB for all 30 blocks of SmolLM2-135M), so a ZO
step that moves along z[k] three times hashes it once. The memory model leaves it out: it
is 1/64 of the 8 bytes per trainable parameter (weights and round snapshot) it counts.
Each move expands the bits to +-1 a chunk at a time into a small int8 buffer that stays
in cache, instead of materialising z for a whole tensor: each packed byte selects one
64-bit row of a 256-row table (its 8 signs as int8), and the add widens the signs to fp32
as it reads them. Per element that is 1 byte written and read, where an fp32 table of
8-float rows cost 4 and a gather three times as slow (0.33 ns against 0.07 ns an element
on one core of this project's 2-core x86 machine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from zorba_common.noise import hash_bytes, ordered_names, packed_sign_table

NamedTensors = Sequence[tuple[str, torch.Tensor]]
"""A block's full-precision tensors, names relative to the block (any order)."""

BlockTensors = Mapping[int, NamedTensors]
"""Block index -> that block's named tensors."""

_CHUNK_BYTES = 1 << 16
"""Packed bytes expanded at a time: 512K elements, a 512 KiB int8 buffer."""


class Direction:
    """z[k] over the given blocks, hashed once and packed (d / 8 bytes for d parameters)."""

    def __init__(self, blocks: BlockTensors, run_seed: int, k: int) -> None:
        self._layout: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (tensor, start, bits)
        for block, tensors in blocks.items():
            by_name = dict(tensors)
            if len(by_name) != len(tensors):
                raise ValueError(f"duplicate parameter names in block {block}")
            names = ordered_names(by_name)
            total = sum(by_name[name].numel() for name in names)
            if not names or total == 0:
                continue
            if total > 1 << 32:
                raise ValueError(f"block {block} has {total} elements; a direction covers 2**32 at most")
            device = by_name[names[0]].device
            bits = hash_bytes(run_seed, k, block, 0, (total + 31) // 32, device)
            start = 0
            for name in names:
                self._layout.append((by_name[name], start, bits))
                start += by_name[name].numel()

    @torch.no_grad()
    def add_(self, scale: float) -> None:
        """In place: theta[b] += scale * z[k, b] for every block.

        The step is computed in fp32 whatever the tensor's dtype, with `scale` rounded to fp32
        first: `theta + scale * z` is then one fp32 rounding (plus one to a narrower dtype),
        the same on every device. Left to each backend, bf16 arithmetic differs by an ulp
        between CPU and CUDA (measured on an H100: 538 of 700,000 elements after one update).
        """
        if scale == 0.0:
            return
        scale = float(np.float32(scale))
        tables: dict[torch.device, torch.Tensor] = {}
        for tensor, start, bits in self._layout:
            if tensor.device not in tables:
                tables[tensor.device] = packed_sign_table(tensor.device)
            _add_packed_(tensor, bits, start, scale, tables[tensor.device])


def _add_packed_(
    tensor: torch.Tensor, bits: torch.Tensor, start: int, scale: float, table: torch.Tensor
) -> None:
    """tensor += scale * (elements [start, start + numel) of the packed direction `bits`).

    `table` is `packed_sign_table`: row v is byte v's 8 signs as int8, held as one int64.
    """
    count = tensor.numel()
    if not tensor.is_contiguous():  # never so for parameters; kept correct, not fast
        signs = table.index_select(0, bits[start // 8 : (start + count + 7) // 8].long())
        z = signs.view(torch.int8)[start % 8 : start % 8 + count].view(tensor.shape)
        _add_fp32_(tensor, z, scale)
        return
    flat = tensor.view(-1)
    step = 8 * _CHUNK_BYTES
    # Sized to the tensor when it is smaller than a chunk: small tensors (norms, biases,
    # tiny test models) then cost no chunk-sized allocation per move.
    buffer = torch.empty(min(_CHUNK_BYTES, count // 8 + 1) + 1, dtype=torch.int64, device=tensor.device)
    for lo in range(start, start + count, step):
        hi = min(lo + step, start + count)
        chunk = bits[lo // 8 : (hi + 7) // 8]
        signs = buffer[: chunk.numel()]
        torch.index_select(table, 0, chunk.int(), out=signs)
        _add_fp32_(flat[lo - start : hi - start], signs.view(torch.int8)[lo % 8 : lo % 8 + hi - lo], scale)


def _add_fp32_(target: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """target += scale * z computed in fp32: z (int8 +-1) is widened exactly, scale * z is
    exact, so the sum is one fp32 rounding (plus one to a narrower target dtype)."""
    if target.dtype == torch.float32:
        target.add_(z, alpha=scale)
    else:
        target.copy_(target.float().add_(z, alpha=scale))


def add_direction_(
    tensors: NamedTensors, run_seed: int, k: int, block: int, scale: float
) -> None:
    """In place: every tensor of `block` moves by `scale` times its slice of z[k, block]."""
    if scale != 0.0 and tensors:
        Direction({block: tensors}, run_seed, k).add_(scale)

