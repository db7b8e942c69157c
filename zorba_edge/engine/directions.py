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
from dataclasses import dataclass

import numpy as np
import torch

from zorba_common.noise import hash_bytes, ordered_names, packed_sign_table

NamedTensors = Sequence[tuple[str, torch.Tensor]]
"""A block's full-precision tensors, names relative to the block (any order)."""

BlockTensors = Mapping[int, NamedTensors]
"""Block index -> that block's named tensors."""

_CHUNK_BYTES = 1 << 16
"""Packed bytes expanded at a time: 512K elements, a 512 KiB int8 buffer, and 2 MiB of fp32
parameters that stay in cache while a move adds each of its terms to them (a quarter of
this was slower on this project's 2-core x86 machine: per-call overhead)."""


class Direction:
    """z[k] over the given blocks, hashed once and packed (d / 8 bytes for d parameters).

    With `held=False` nothing is hashed up front: a move hashes each block's bits as it
    reaches that block and lets them go after it (a block's bits, not the whole direction's,
    at a time), for a direction a move needs once more after the step let it go."""

    def __init__(self, blocks: BlockTensors, run_seed: int, k: int, held: bool = True) -> None:
        self.run_seed, self.k = run_seed, k
        self._layout = _layout(blocks)
        self._bits = ([_hash_block(run_seed, k, block, slots) for block, slots in self._layout]
                      if held else None)

    def block_bits(self, index: int) -> torch.Tensor:
        """The packed bits of the `index`-th block of the layout."""
        if self._bits is not None:
            return self._bits[index]
        block, slots = self._layout[index]
        return _hash_block(self.run_seed, self.k, block, slots)

    def add_(self, scale: float) -> None:
        """In place: theta[b] += scale * z[k, b] for every block.

        The step is computed in fp32 whatever the tensor's dtype, with `scale` rounded to fp32
        first: `theta + scale * z` is then one fp32 rounding (plus one to a narrower dtype),
        the same on every device. Left to each backend, bf16 arithmetic differs by an ulp
        between CPU and CUDA (measured on an H100: 538 of 700,000 elements after one update).
        """
        move_([Term(scale, self)])


@dataclass(frozen=True)
class Term:
    """theta += scale * z, or theta += scale * (z - minus): z - minus is -2, 0 or 2, so
    scale * (z - minus) is exact and the term is one fp32 rounding, like a plain move. The
    difference moves theta + s z_1 to theta + s z_2 in one pass and one rounding, where
    undoing z_1 and then moving along z_2 took two of each (and left the elements where
    z_1 = z_2 exactly where they were, where the undo rounded them)."""

    scale: float
    z: Direction
    minus: Direction | None = None


@torch.no_grad()
def move_(terms: Sequence[Term]) -> None:
    """In place: the terms in order, each its own fp32 rounding, exactly as separate moves
    would make them (the same bits), but in one pass over the parameters: a chunk of them is
    read, moved by every term while it is in cache, and written back. A move's cost is that
    memory traffic (8 bytes an fp32 parameter) and the widening of the signs, against 1/8
    byte of packed bits per direction. All directions must span the same tensors (made from
    the same `blocks`)."""
    terms = [Term(float(np.float32(t.scale)), t.z, t.minus) for t in terms if t.scale != 0.0]
    if not terms:
        return
    layout = terms[0].z._layout
    for term in terms:
        for z in (term.z, term.minus):
            if z is not None and z._layout is not layout and not _same_layout(z._layout, layout):
                raise ValueError("the directions of one move must span the same tensors")
    tables: dict[torch.device, torch.Tensor] = {}
    for index, (_, slots) in enumerate(layout):
        device = slots[0][0].device
        if device not in tables:
            tables[device] = packed_sign_table(device)
        bits = [(t.z.block_bits(index), None if t.minus is None else t.minus.block_bits(index), t.scale)
                for t in terms]
        for tensor, start in slots:
            _move_tensor_(tensor, start, bits, tables[device])


Layout = list[tuple[int, list[tuple[torch.Tensor, int]]]]
"""(block, [(tensor, index of its first element in the block's direction), ...]) per block."""


def _layout(blocks: BlockTensors) -> Layout:
    """Each non-empty block's tensors in canonical (name) order, with their first element."""
    layout = []
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
        slots, start = [], 0
        for name in names:
            slots.append((by_name[name], start))
            start += by_name[name].numel()
        layout.append((block, slots))
    return layout


def _same_layout(a: Layout, b: Layout) -> bool:
    return len(a) == len(b) and all(
        block_a == block_b and len(slots_a) == len(slots_b)
        and all(x is y and i == j for (x, i), (y, j) in zip(slots_a, slots_b, strict=True))
        for (block_a, slots_a), (block_b, slots_b) in zip(a, b, strict=True))


def _hash_block(run_seed: int, k: int, block: int, slots: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    last, start = slots[-1]
    return hash_bytes(run_seed, k, block, 0, (start + last.numel() + 31) // 32, last.device)


PackedTerm = tuple[torch.Tensor, torch.Tensor | None, float]
"""A term's packed bits (z, minus or None) over one block, and its fp32 scale."""


def _move_tensor_(tensor: torch.Tensor, start: int, terms: list[PackedTerm], table: torch.Tensor) -> None:
    """`tensor` (elements [start, start + numel) of its block's directions) moved by each
    term in order, a chunk at a time.

    `table` is `packed_sign_table`: row v is byte v's 8 signs as int8, held as one int64.
    """
    count = tensor.numel()
    if not tensor.is_contiguous():  # never so for parameters; kept correct, not fast
        for plus, minus, scale in terms:
            z = _expand(plus, start, start + count, table)
            if minus is not None:
                z = z - _expand(minus, start, start + count, table)
            _add_fp32_(tensor, z.view(tensor.shape), scale)
        return
    flat = tensor.view(-1)
    step = 8 * _CHUNK_BYTES
    # Sized to the tensor when it is smaller than a chunk: small tensors (norms, biases,
    # tiny test models) then cost no chunk-sized allocation per move.
    size = min(_CHUNK_BYTES, count // 8 + 1) + 1
    device = tensor.device
    buffers = (torch.empty(size, dtype=torch.int64, device=device),
               torch.empty(size, dtype=torch.int64, device=device))
    index = torch.empty(size, dtype=torch.int32, device=device)
    widened = torch.empty(min(step, count), dtype=torch.float32, device=device)
    for lo in range(start, start + count, step):
        hi = min(lo + step, start + count)
        target = flat[lo - start : hi - start]
        for plus, minus, scale in terms:
            z = _expand(plus, lo, hi, table, buffers[0], index)
            if minus is not None:
                z.sub_(_expand(minus, lo, hi, table, buffers[1], index))
            _add_fp32_(target, z, scale, widened[: hi - lo])


def _expand(bits: torch.Tensor, lo: int, hi: int, table: torch.Tensor,
            out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """Elements [lo, hi) of the packed direction `bits` as int8 +-1 (a view into `out`)."""
    first, end = lo // 8, (hi + 7) // 8
    if out is None or index is None:
        signs = table.index_select(0, bits[first:end].long())
    else:
        rows = index[: end - first].copy_(bits[first:end])
        signs = torch.index_select(table, 0, rows, out=out[: end - first])
    return signs.view(torch.int8)[lo % 8 : lo % 8 + hi - lo]


def _add_fp32_(target: torch.Tensor, z: torch.Tensor, scale: float,
               widened: torch.Tensor | None = None) -> None:
    """target += scale * z computed in fp32: z (small int8 values) is widened exactly, scale * z
    is exact, so the sum is one fp32 rounding (plus one to a narrower target dtype). Widening
    into `widened` first and adding fp32 to fp32 is 1.3x faster on CPU than torch's add of an
    int8 tensor to an fp32 one, which converts element by element."""
    if target.dtype == torch.float32:
        target.add_(z if widened is None else widened.copy_(z), alpha=scale)
    else:
        target.copy_(target.float().add_(z, alpha=scale))


def add_direction_(
    tensors: NamedTensors, run_seed: int, k: int, block: int, scale: float
) -> None:
    """In place: every tensor of `block` moves by `scale` times its slice of z[k, block]."""
    if scale != 0.0 and tensors:
        Direction({block: tensors}, run_seed, k).add_(scale)
