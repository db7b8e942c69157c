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

A move is memory-bound (theta read and written: 8 bytes an fp32 parameter, against 1/8 byte
of packed bits), so `move_` makes several in one pass: a chunk of the parameters is moved by
every `Term` while it is in cache, each term still its own rounding. The one-sided estimator
uses it for theta + mu z_i -> theta + mu z_(i+1) (one exact difference, one rounding) and
for its local step (the restore and the n updates in one pass), the sync for a block's
increments. At 30 blocks of SmolLM2, in forwards of one core's CPU time
(`benchmarks/zo_step.py`): a hash 0.007, a move 0.046 (expansion 0.013, update 0.033), a
difference 0.062, the one-sided local step over 4 directions 0.176.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zorba_common.noise import hash_bytes, ordered_names, packed_sign_table, sign_table

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
    if not layout:
        return
    for term in terms:
        for z in (term.z, term.minus):
            if z is not None and z._layout is not layout and not _same_layout(z._layout, layout):
                raise ValueError("the directions of one move must span the same tensors")
    largest = max(tensor.numel() for _, slots in layout for tensor, _ in slots)
    kernels: dict[torch.device, _Kernel] = {}
    for index, (_, slots) in enumerate(layout):
        device = slots[0][0].device
        if device not in kernels:
            kernels[device] = _Kernel(device, largest, any(t.minus is not None for t in terms))
        kernel = kernels[device]
        bits = [(t.z.block_bits(index), None if t.minus is None else t.minus.block_bits(index), t.scale)
                for t in terms]
        for tensor, start in slots:
            kernel.move_tensor_(tensor, start, bits)


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
"""A term's packed bits over one block (z, minus or None) and its fp32 scale."""


class _Kernel:
    """What a move needs on one device, made once per move: the sign tables and scratch
    buffers sized for the largest tensor (up to a chunk), with views of them kept by length:
    a move makes ~10 tensor calls per chunk and term, a few microseconds each, which is 10%
    of a move over SmolLM2's 270 tensors unless each is a single call."""

    def __init__(self, device: torch.device, largest: int, differences: bool) -> None:
        self.table = packed_sign_table(device)
        # Row 256 a + b: the 8 lanes of z_a - z_b for packed bytes a and b (512 KiB), so a
        # difference costs one expansion instead of two and a subtraction (1.5x faster).
        self.pairs = pair_sign_table(device) if differences else None
        self.expanded = torch.empty(min(_CHUNK_BYTES, largest // 8 + 1) + 1, dtype=torch.int64, device=device)
        self.widened = torch.empty(min(8 * _CHUNK_BYTES, largest), dtype=torch.float32, device=device)
        self._views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def rows(self, plus: torch.Tensor, minus: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The table rows for packed bytes of z_plus (- z_minus), one int32 a byte, and the table."""
        rows = plus.to(torch.int32)
        if minus is None or self.pairs is None:
            return rows, self.table
        return rows.mul_(256).add_(minus), self.pairs

    def move_tensor_(self, tensor: torch.Tensor, start: int, terms: list[PackedTerm]) -> None:
        """`tensor` (elements [start, start + numel) of its block's directions) moved by each
        term in order, a chunk at a time."""
        count = tensor.numel()
        if not tensor.is_contiguous():  # never so for parameters; kept correct, not fast
            dense = tensor.contiguous()
            self.move_tensor_(dense, start, terms)
            tensor.copy_(dense)
            return
        flat = tensor.view(-1)
        # The tensor's packed bytes: their table rows are made once per term (tensor calls
        # by method, not by indexing: a third of the Python cost).
        base, size = start // 8, (start + count + 7) // 8 - start // 8
        rows = [self.rows(plus.narrow(0, base, size), None if minus is None else minus.narrow(0, base, size))
                + (scale,) for plus, minus, scale in terms]
        step = 8 * _CHUNK_BYTES
        for lo in range(start, start + count, step):
            hi = min(lo + step, start + count)
            target = flat if hi - lo == count else flat.narrow(0, lo - start, hi - lo)
            first, end = lo // 8 - base, (hi + 7) // 8 - base
            expanded, signs, widened = self._view(end - first, lo % 8, hi - lo)
            for chunk_rows, table, scale in rows:
                torch.index_select(table, 0, chunk_rows if end - first == size
                                   else chunk_rows.narrow(0, first, end - first), out=expanded)
                _add_fp32_(target, signs, scale, widened)

    def _view(self, packed: int, offset: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scratch views for a chunk of `count` elements starting `offset` into its first of
        `packed` bytes: the expanded rows (int64), their signs (int8), the widened signs."""
        key = (packed, offset, count)
        if key not in self._views:
            expanded = self.expanded[:packed]
            self._views[key] = (expanded, expanded.view(torch.int8)[offset : offset + count],
                                self.widened[:count])
        return self._views[key]


def pair_sign_table(device: torch.device | str) -> torch.Tensor:
    """Row 256 a + b holds z_a - z_b (-2, 0 or 2) for the 8 elements of packed bytes a and b,
    as int8 held in one int64 (like `packed_sign_table`)."""
    signs = sign_table(device, torch.int8)
    return (signs.unsqueeze(1) - signs.unsqueeze(0)).contiguous().view(torch.int64).view(-1)


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
