"""The packed direction: the same moves as z materialised in full, hashed once per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from packaged_assets import CUDA_REASON

import zorba_edge.engine.directions as directions
from zorba_common.noise import rademacher
from zorba_edge.engine.directions import Direction, add_direction_
from zorba_edge.engine.zo import ZOConfig, zo_step


def reference_add_(tensors: list[tuple[str, torch.Tensor]], seed: int, k: int, block: int,
                   scale: float) -> None:
    """theta += scale * z with z made in full by `rademacher`, element order by name."""
    scale = float(np.float32(scale))
    start = 0
    for _, tensor in sorted(tensors, key=lambda item: item[0]):
        z = rademacher(seed, k, block, start, tensor.numel(), dtype=torch.float32).view(tensor.shape)
        tensor.copy_(tensor.float().add_(z, alpha=scale))
        start += tensor.numel()


def odd_block(dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Tensors whose starts fall mid-byte and mid-word, one spanning several expansion chunks."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.bias": (3,), "b.weight": (5, 7), "c.big": (1_200_001,), "d.norm": (33,)}
    return [(name, torch.randn(shape, generator=gen).to(dtype)) for name, shape in shapes.items()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_moves_equal_the_full_direction_bit_for_bit(dtype: torch.dtype) -> None:
    ours, reference = odd_block(dtype), odd_block(dtype)
    z = Direction({4: ours}, 7, 11)
    for scale in (1e-3, -2e-3, 1e-3 - 3.7e-6):
        z.add_(scale)
        reference_add_(reference, 7, 11, 4, scale)
    for (name, a), (_, b) in zip(ours, reference, strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ours[2][1], odd_block(dtype)[2][1])


def test_a_non_contiguous_tensor_moves_like_a_contiguous_one() -> None:
    base = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    strided, dense = base.t(), base.t().contiguous()
    add_direction_([("w", strided)], 2, 3, 0, 0.5)
    add_direction_([("w", dense)], 2, 3, 0, 0.5)
    assert torch.equal(strided, dense)


def test_a_step_hashes_each_block_once_and_moves_theta_three_times(monkeypatch) -> None:
    hashed, moves = [], []
    real_hash, real_add = directions.hash_bytes, Direction.add_

    def counting_hash(*args, **kwargs):
        hashed.append(args[2])
        return real_hash(*args, **kwargs)

    def counting_add(self, scale):
        moves.append(scale)
        return real_add(self, scale)

    monkeypatch.setattr(directions, "hash_bytes", counting_hash)
    monkeypatch.setattr(Direction, "add_", counting_add)
    blocks = {b: odd_block(torch.float32)[:2] for b in (0, 3)}
    result = zo_step(torch.nn.Identity(), blocks, lambda m, b: blocks[0][0][1].sum(), None, 1, 5,
                     ZOConfig(mu=1e-3, lr=1e-2))
    assert sorted(hashed) == [0, 3]
    assert moves == [1e-3, -2e-3, pytest.approx(1e-3 - 1e-2 * result.projected_grad)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_moves_on_cuda_equal_those_on_cpu_bit_for_bit(dtype: torch.dtype) -> None:
    on_cpu = odd_block(dtype)
    on_cuda = [(name, t.to("cuda")) for name, t in odd_block(dtype)]
    for block in (on_cpu, on_cuda):
        z = Direction({4: block}, 7, 11)
        for scale in (1e-3, -2e-3, 1e-3 - 3.7e-6):
            z.add_(scale)
    for (name, a), (_, b) in zip(on_cpu, on_cuda, strict=True):
        assert torch.equal(a, b.cpu()), name
