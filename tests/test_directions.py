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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_move_of_several_terms_equals_the_moves_one_by_one_bit_for_bit(dtype: torch.dtype) -> None:
    ours, reference = odd_block(dtype), odd_block(dtype)
    scales = (1e-3, -2.5e-3, 7e-4)
    directions.move_([directions.Term(s, Direction({4: ours}, 7, k, held=k != 1))
                      for k, s in enumerate(scales)])
    for k, s in enumerate(scales):
        reference_add_(reference, 7, k, 4, s)
    for (name, a), (_, b) in zip(ours, reference, strict=True):
        assert torch.equal(a, b), name


def test_a_difference_moves_theta_in_one_rounding_and_leaves_equal_signs_untouched() -> None:
    ours, start = odd_block(torch.float32), odd_block(torch.float32)
    z1, z2 = Direction({4: ours}, 7, 1), Direction({4: ours}, 7, 2)
    directions.move_([directions.Term(1e-3, z2, z1)])
    scale = float(np.float32(1e-3))
    for (name, moved), (_, before) in zip(ours, start, strict=True):
        first, total = 0, 0
        for other, tensor in start:
            if other == name:
                first = total
            total += tensor.numel()
        d = (rademacher(7, 2, 4, first, moved.numel(), dtype=torch.float64)
             - rademacher(7, 1, 4, first, moved.numel(), dtype=torch.float64)).view(moved.shape)
        # theta + s (z2 - z1) exactly, then rounded to fp32 once.
        assert torch.equal(moved, (before.double() + scale * d).float()), name
        assert torch.equal(moved[d == 0], before[d == 0])


def test_directions_of_other_tensors_cannot_share_a_move() -> None:
    a, b = odd_block(torch.float32), odd_block(torch.float32)
    with pytest.raises(ValueError, match="same tensors"):
        directions.move_([directions.Term(1.0, Direction({4: a}, 7, 1)),
                          directions.Term(1.0, Direction({4: b}, 7, 2))])


def test_a_sync_of_many_increments_equals_one_move_per_increment_bit_for_bit() -> None:
    from zorba_edge.engine.coefficients import SYNC_TERMS, AlphaIncrement, apply_increments_

    ours = {b: odd_block(torch.float32) for b in (0, 2)}
    reference = {b: odd_block(torch.float32) for b in (0, 2)}
    increments = [AlphaIncrement(k % 7, (0, 2, 5)[k % 3], (-1) ** k * 1e-3 * (k + 1))
                  for k in range(2 * SYNC_TERMS + 3)]
    apply_increments_(ours, 3, increments)
    for inc in increments:
        if inc.block in reference:
            reference_add_(reference[inc.block], 3, inc.k, inc.block, -inc.delta)
    for b in ours:
        for (name, a), (_, r) in zip(ours[b], reference[b], strict=True):
            assert torch.equal(a, r), (b, name)


def test_the_one_sided_estimator_holds_one_direction_during_its_forwards_and_hashes_each_once(
        monkeypatch) -> None:
    import gc
    import weakref

    from zorba_edge.engine.zo import one_sided_estimate

    alive: weakref.WeakSet[Direction] = weakref.WeakSet()
    hashed: list[int] = []
    real_init, real_hash = Direction.__init__, directions.hash_bytes

    def tracking_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self._bits is not None:
            alive.add(self)

    def counting_hash(*args, **kwargs):
        hashed.append(args[1])
        return real_hash(*args, **kwargs)

    held_at_forwards = []

    def loss(model, batch):
        gc.collect()
        held_at_forwards.append(len(alive))
        return blocks[0][0][1].sum()

    monkeypatch.setattr(Direction, "__init__", tracking_init)
    monkeypatch.setattr(directions, "hash_bytes", counting_hash)
    blocks = {0: odd_block(torch.float32)[:2]}
    one_sided_estimate(torch.nn.Identity(), blocks, loss, None, 1, [3, 4, 5, 6], ZOConfig(mu=1e-3, lr=1e-2))
    assert held_at_forwards == [0, 1, 1, 1, 1]
    # Each direction hashed for its perturbation, the first three again for the local step.
    assert sorted(hashed) == [3, 3, 4, 4, 5, 5, 6]
