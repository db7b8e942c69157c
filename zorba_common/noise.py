"""Portable seeded perturbation directions z[k, b] (docs/design.md §3).

Every device of a federation must regenerate the same direction from (run seed, pool
index k, block b), whatever its processor: torch's generators give different streams on
CPU, CUDA and MPS, so seeding them would silently make clients disagree on the model.
Here each element of z[k, b] is a Rademacher sign that is a pure function of
(run_seed, k, b, element index), computed with int64 tensor ops on the tensor's own
device, where every product stays below 2**63 (32-bit state times a constant below 2**31),
so no step relies on how a device handles overflow; on the CPU with numpy's uint32, whose
products wrap modulo 2**32 by definition. The result is bit-identical everywhere.

Element indices run over block b's parameters concatenated in the order of their names
(relative to the block), so a direction does not depend on module construction order.

This module is the single source of truth for the directions: the client engine, the
server's export and every test import it. `tests/test_noise.py` pins golden values;
changing anything here changes the directions of every past run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 (so x * C < 2**63 for any 32-bit x).
_INDEX_MULTIPLIER = 0x2C1B3C6D
_MIX_MULTIPLIER_1 = 0x7FEB352D
_MIX_MULTIPLIER_2 = 0x5F356495
_WORDS = 1 << 27  # 2**32 elements per block, 32 per hash word
_CHUNK = 1 << 16  # hash words per chunk (2M elements): bounds the scratch to a few MiB
_LITTLE_ENDIAN = sys.byteorder == "little"


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


def direction_keys(run_seed: int, k: int, block: int) -> tuple[int, int]:
    """Two 32-bit keys that identify direction z[k, block] of a run (pure Python ints)."""
    for name, value in (("run_seed", run_seed), ("k", k), ("block", block)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    state = _splitmix64(run_seed & 0xFFFFFFFFFFFFFFFF)
    state = _splitmix64(state ^ k)
    state = _splitmix64(state ^ (block << 32))
    return state & _MASK32, state >> 32


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In-place 32-bit avalanche (xorshift-multiply, lowbias32 shape) on int64 storage."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_MIX_MULTIPLIER_1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MIX_MULTIPLIER_2).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    return x


def sign_table(device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Row v holds the 8 signs of byte v, least significant bit first (bit 1 -> -1)."""
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    return (1 - 2 * bits).to(dtype)


def packed_sign_table(device: torch.device | str) -> torch.Tensor:
    """`sign_table` in int8, each row's 8 bytes held as one int64 (256 elements): gathering
    one int64 per packed byte copies its 8 signs at once, which a gather of 8-wide rows does
    at a third of the speed. Viewing the result as int8 gives the signs back in order on any
    byte order (the bytes are only moved, never read as a number)."""
    return sign_table(device, torch.int8).contiguous().view(torch.int64).view(-1)


def hash_bytes(
    run_seed: int, k: int, block: int, first_word: int, words: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Hash words [first_word, first_word + words) of z[k, block], as 4 * words bytes (uint8).

    Byte 4 w + j is byte j (least significant first) of the hash of word first_word + w,
    so bit i of the result is element 32 * first_word + i of z[k, block] (1 for -1, 0 for
    +1): a whole direction packed 8 elements to a byte, made the same way on every device.
    On the CPU the words are hashed as numpy uint32 (`_hash_words_uint32`), elsewhere as
    int64 tensors on the device (`_hash_words_int64`): the same function, bit for bit
    (`tests/test_noise.py` compares them and pins golden values through both).
    """
    if first_word < 0 or words < 0 or first_word + words > _WORDS:
        raise ValueError(f"hash words [{first_word}, {first_word + words}) are outside [0, 2**27)")
    keys = direction_keys(run_seed, k, block)
    if torch.device(device).type == "cpu":
        return torch.from_numpy(_hash_words_uint32(keys, first_word, words))
    return _hash_words_int64(keys, first_word, words, device)


def _hash_words_uint32(keys: tuple[int, int], first_word: int, words: int) -> np.ndarray:
    """The CPU's hash: numpy's uint32 arithmetic wraps modulo 2**32 by definition, which is
    exactly the `& _MASK32` the int64 path spends a pass on after every product, at half the
    bytes a word: 4x faster than the int64 tensors on one core of this project's x86 machine
    (0.06 against 0.25 ns an element), and the hash is a third of a step's work beyond its
    forwards. Returns the bytes (uint8), least significant byte of each word first."""
    key_index, key_mix = np.uint32(keys[0]), np.uint32(keys[1])
    out = np.empty(words, dtype=np.uint32)
    scratch = np.empty(min(words, _CHUNK), dtype=np.uint32)
    for offset in range(0, words, _CHUNK):
        n = min(_CHUNK, words - offset)
        x, tmp = out[offset : offset + n], scratch[:n]
        x[:] = np.arange(first_word + offset, first_word + offset + n, dtype=np.uint32)
        np.multiply(x, np.uint32(_INDEX_MULTIPLIER), out=x)
        np.add(x, key_index, out=x)
        _mix32_uint32_(x, tmp)
        np.bitwise_xor(x, key_mix, out=x)
        _mix32_uint32_(x, tmp)
    if not _LITTLE_ENDIAN:
        out.byteswap(inplace=True)
    return out.view(np.uint8)


def _mix32_uint32_(x: np.ndarray, tmp: np.ndarray) -> None:
    """`_mix32_` on uint32 (products wrap modulo 2**32), `tmp` a scratch array like `x`."""
    for shift, multiplier in ((16, _MIX_MULTIPLIER_1), (15, _MIX_MULTIPLIER_2)):
        np.right_shift(x, shift, out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        np.multiply(x, np.uint32(multiplier), out=x)
    np.right_shift(x, 16, out=tmp)
    np.bitwise_xor(x, tmp, out=x)


def _hash_words_int64(
    keys: tuple[int, int], first_word: int, words: int, device: torch.device | str
) -> torch.Tensor:
    """The hash as int64 tensor ops on any device: every product stays below 2**63, so no
    step relies on how a device handles overflow."""
    key_index, key_mix = keys
    byte_shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
    out = torch.empty(4 * words, dtype=torch.uint8, device=device)
    for offset in range(0, words, _CHUNK):
        n = min(_CHUNK, words - offset)
        x = torch.arange(first_word + offset, first_word + offset + n, dtype=torch.int64, device=device)
        x.mul_(_INDEX_MULTIPLIER).add_(key_index).bitwise_and_(_MASK32)
        _mix32_(x)
        x.bitwise_xor_(key_mix)
        _mix32_(x)
        if _LITTLE_ENDIAN:
            # The word's int32 bytes are its bytes least significant first: a 13x cheaper
            # split than shifting. x - 2**32 above 2**31 makes it fit int32 without relying
            # on how a device wraps an overflowing cast.
            x.sub_((x >> 31) << 32)
            out[4 * offset : 4 * (offset + n)].view(torch.int32).copy_(x)
        else:
            out[4 * offset : 4 * (offset + n)] = (x.unsqueeze(1) >> byte_shifts).bitwise_and_(0xFF).view(-1)
    return out


def rademacher(
    run_seed: int,
    k: int,
    block: int,
    start: int,
    count: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """Elements [start, start + count) of z[k, block] as +1/-1 in `dtype`, made on `device`.

    Element i is bit (i mod 32) of the 32-bit hash of word i // 32: one hash serves 32
    elements, and a 256-row table turns each hash byte into 8 signs. Hashing per element
    would cost ~12 int64 passes per element; this costs under one.
    """
    if start < 0 or count < 0 or start + count > 1 << 32:
        raise ValueError(f"element range [{start}, {start + count}) is outside [0, 2**32)")
    table = sign_table(device, dtype)
    out = torch.empty(count, dtype=dtype, device=device)
    first_word = start // 32
    last_word = (start + count + 31) // 32  # exclusive
    for word in range(first_word, last_word, _CHUNK):
        words = min(_CHUNK, last_word - word)
        packed = hash_bytes(run_seed, k, block, word, words, device)
        signs = table.index_select(0, packed.long()).view(-1)  # 32 signs per word
        lo = max(start, word * 32)
        hi = min(start + count, (word + words) * 32)
        out[lo - start : hi - start] = signs[lo - word * 32 : hi - word * 32]
    return out


def ordered_names(names: Iterable[str]) -> list[str]:
    """The canonical parameter order of a block: by name."""
    return sorted(names)


def block_direction(
    run_seed: int,
    k: int,
    block: int,
    shapes: Sequence[tuple[str, torch.Size]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.int8,
) -> Iterator[tuple[str, torch.Tensor]]:
    """z[k, block] split into tensors shaped like the block's parameters, in canonical order.

    `shapes` lists every full-precision parameter of the block (name relative to the
    block, shape); the element index of a parameter starts where the previous one, in
    name order, ended.
    """
    by_name = dict(shapes)
    if len(by_name) != len(shapes):
        raise ValueError("duplicate parameter names in a block")
    start = 0
    for name in ordered_names(by_name):
        shape = by_name[name]
        count = shape.numel()
        yield name, rademacher(run_seed, k, block, start, count, device, dtype).view(shape)
        start += count
