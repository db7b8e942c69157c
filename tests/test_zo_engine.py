"""The zeroth-order step and its bookkeeping on tiny random Llama models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from zorba_common.errors import AssignmentError, InvalidScalarError
from zorba_common.noise import block_direction
from zorba_edge.engine.coefficients import (
    AlphaIncrement,
    CoefficientTable,
    apply_increments_,
    block_materializer,
)
from zorba_edge.engine.directions import BlockTensors
from zorba_edge.engine.snapshot import RoundSnapshot, SnapshotBuffers
from zorba_edge.engine.zo import (
    ZOConfig,
    projected_gradient,
    zo_step,
)

VOCAB = 32


def tiny_llama(hidden: int, intermediate: int, layers: int = 2, init: float = 0.02,
               seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=32, initializer_range=init,
    )
    return LlamaForCausalLM(config).eval()


def assigned(model: LlamaForCausalLM, *blocks: int) -> BlockTensors:
    return {b: sorted(model.model.layers[b].named_parameters()) for b in blocks}


def flat(tensors: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for _, t in sorted(tensors)])


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def constant_target_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch).logits
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.full((batch.numel(),), 5))


def random_batch(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, cols), generator=torch.Generator().manual_seed(seed))


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_estimate_is_unbiased_and_frozen_blocks_never_change() -> None:
    # cos(mean of g_k z_k, grad) ~ 1/sqrt(1 + d/N) for Rademacher z: d = 120 assigned
    # parameters, N = 1000 directions predicts 0.945; measured 0.94-0.95 over seeds.
    model = tiny_llama(hidden=4, intermediate=4)
    batch = random_batch(4, 12)
    blocks = assigned(model, 1)
    names_shapes = [(n, p.shape) for n, p in blocks[1]]
    lm_loss(model, batch).backward()
    grad = torch.cat([p.grad.flatten() for _, p in blocks[1]])
    model.zero_grad(set_to_none=True)
    frozen_before = {n: t for n, t in snapshot_state(model).items() if not n.startswith("model.layers.1.")}

    directions, estimate = 1000, torch.zeros_like(grad)
    for k in range(directions):
        plus, minus = projected_gradient(model, blocks, lm_loss, batch, run_seed=3, k=k, mu=1e-3)
        z = torch.cat([t.flatten() for _, t in block_direction(3, k, 1, names_shapes, dtype=torch.float32)])
        estimate += (plus - minus) / 2e-3 * z
    cosine = nn.functional.cosine_similarity(estimate / directions, grad, dim=0).item()

    assert grad.numel() == 120
    assert cosine >= 0.9
    after = snapshot_state(model)
    assert all(torch.equal(after[n], t) for n, t in frozen_before.items())


def test_restore_after_two_perturbations_is_within_a_few_ulps() -> None:
    model = tiny_llama(hidden=64, intermediate=128)
    blocks = assigned(model, 0, 1)
    before = {b: flat(list(t)) for b, t in blocks.items()}
    mu = 1e-3
    for k in range(5):
        projected_gradient(model, blocks, lm_loss, random_batch(2, 8), run_seed=1, k=k, mu=mu)
    # +mu, -2mu, +mu in fp32: each add rounds once, so an element drifts by at most about
    # one ulp of |theta| + 2 mu per add. Measured: 5 ulps of 1.0 at worst (norm weights).
    eps = torch.finfo(torch.float32).eps
    for b, tensors in blocks.items():
        after = flat(list(tensors))
        bound = 5 * 3 * eps * (before[b].abs() + 2 * mu)
        assert ((after - before[b]).abs() <= bound).all()
        assert not torch.equal(after, before[b])  # the drift is real: hence the round snapshot


def test_round_end_revert_restores_round_start_bit_for_bit() -> None:
    model = tiny_llama(hidden=16, intermediate=32)
    blocks = assigned(model, 1)
    start = flat(list(blocks[1]))
    snapshot = RoundSnapshot(blocks)
    for k in range(10):
        zo_step(model, blocks, lm_loss, random_batch(2, 8), 5, k, ZOConfig(mu=1e-3, lr=1e-2))
    assert not torch.equal(flat(list(blocks[1])), start)
    snapshot.revert()
    assert torch.equal(flat(list(blocks[1])), start)


def test_snapshots_into_kept_buffers_revert_bit_for_bit_and_reuse_the_same_storage() -> None:
    """The simulator snapshots every round into the same host buffers: each round's revert
    must still restore that round's start exactly (not the first round's)."""
    model = tiny_llama(hidden=16, intermediate=32)
    blocks = assigned(model, 0, 1)
    buffers = SnapshotBuffers()
    storage: set[tuple[int, ...]] = set()
    for round_ in range(3):
        start = {b: flat(list(blocks[b])) for b in blocks}
        snapshot = RoundSnapshot(blocks, buffers)
        storage.add(tuple(t.data_ptr() for saved in snapshot._saved.values() for t in saved))
        for k in range(4):
            zo_step(model, blocks, lm_loss, random_batch(2, 8), 5, 10 * round_ + k,
                    ZOConfig(mu=1e-3, lr=1e-2))
        snapshot.revert()
        for b in blocks:
            assert torch.equal(flat(list(blocks[b])), start[b])
        # The next round starts elsewhere (a sync), so a stale buffer would show.
        apply_increments_(blocks, 5, [AlphaIncrement(round_, b, 0.1) for b in blocks])
    assert len(storage) == 1  # one set of buffers, written again each round
    assert buffers.nbytes == sum(p.numel() * 4 for b in blocks for _, p in blocks[b])


def test_local_step_moves_along_minus_lr_g_z() -> None:
    model = tiny_llama(hidden=16, intermediate=32)
    blocks = assigned(model, 0)
    shapes = [(n, p.shape) for n, p in blocks[0]]
    before = flat(list(blocks[0]))
    result = zo_step(model, blocks, lm_loss, random_batch(2, 8), 9, 4, ZOConfig(mu=1e-3, lr=0.5))
    z = torch.cat([t.flatten() for _, t in block_direction(9, 4, 0, shapes, dtype=torch.float32)])
    expected = before - 0.5 * result.projected_grad * z
    assert torch.allclose(flat(list(blocks[0])), expected, atol=1e-6)
    assert math.isclose(result.projected_grad, (result.loss_plus - result.loss_minus) / 2e-3)


def test_a_few_hundred_steps_lower_the_loss_clearly() -> None:
    model = tiny_llama(hidden=16, intermediate=32, init=0.2)
    blocks = assigned(model, 0, 1)
    batch = random_batch(8, 12)
    initial = constant_target_loss(model, batch).item()
    config = ZOConfig(mu=1e-3, lr=1e-2)
    for k in range(300):
        zo_step(model, blocks, constant_target_loss, batch, 7, k, config)
    final = constant_target_loss(model, batch).item()
    # Measured 3.69 -> 1.08 with this seed.
    assert final < 0.6 * initial


def test_materialising_from_scratch_matches_incremental_sync() -> None:
    model = tiny_llama(hidden=64, intermediate=128)
    base = snapshot_state(model)
    blocks = assigned(model, 0, 1)
    table = CoefficientTable(pool_size=64, num_blocks=2)
    rng = torch.Generator().manual_seed(0)
    for _ in range(40):  # rounds of increments, some pool indices repeating
        ks = torch.randint(0, 64, (8,), generator=rng).tolist()
        deltas = (torch.randn(8, 2, generator=rng) * 1e-4).tolist()
        increments = [AlphaIncrement(k, b, d[b]) for k, d in zip(ks, deltas, strict=True) for b in (0, 1)]
        apply_increments_(blocks, 11, increments)
        table.apply(increments)

    def base_block(b: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{b}."
        return {n[len(prefix):]: t for n, t in base.items() if n.startswith(prefix)}

    materialize = block_materializer(base_block, table, run_seed=11)
    for b in (0, 1):
        scratch = materialize(b)
        incremental = dict(blocks[b])
        for name, tensor in scratch.items():
            # 320 fp32 updates per block, one rounding each, against one summed update per
            # distinct k. Measured: at most 1.1e-7 on weights of ~0.02 and 1.7e-6 on norm
            # weights of 1.0, while the updates moved parameters by ~5e-3.
            gap = (tensor - incremental[name]).abs()
            assert (gap <= 1e-5 * tensor.abs() + 2e-7).all(), name
        assert not torch.equal(scratch["mlp.up_proj.weight"], base_block(b)["mlp.up_proj.weight"])


def test_a_nan_projected_gradient_is_refused_and_changes_nothing() -> None:
    model = tiny_llama(hidden=16, intermediate=32)
    blocks = assigned(model, 0)
    before = flat(list(blocks[0]))

    def nan_loss(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float("nan"))

    with pytest.raises(InvalidScalarError, match="projected gradient at k=3 is nan"):
        zo_step(model, blocks, nan_loss, random_batch(2, 8), 0, 3, ZOConfig())
    # No local step was taken: only the restore's rounding (a few ulps) remains.
    eps = torch.finfo(torch.float32).eps
    assert ((flat(list(blocks[0])) - before).abs() <= 3 * eps * (before.abs() + 2e-3)).all()


@pytest.mark.parametrize(
    "increment,error,message",
    [
        (AlphaIncrement(0, 0, float("nan")), InvalidScalarError, r"\(k=0, block=0\) is nan"),
        (AlphaIncrement(0, 7, 1.0), AssignmentError, "block 7 does not exist: the model has 2 blocks"),
        (AlphaIncrement(99, 0, 1.0), AssignmentError, "pool index 99 is outside the pool of 4"),
    ],
)
def test_bad_increments_are_refused_and_leave_the_table_unchanged(
    increment: AlphaIncrement, error: type[Exception], message: str
) -> None:
    table = CoefficientTable(pool_size=4, num_blocks=2)
    with pytest.raises(error, match=message):
        table.apply([AlphaIncrement(1, 1, 0.5), increment])
    assert table.version == 0
    assert not table.values.any()


@pytest.mark.parametrize("mu,lr", [(0.0, 1e-3), (float("nan"), 1e-3), (1e-3, -1.0)])
def test_bad_hyper_parameters_are_refused(mu: float, lr: float) -> None:
    with pytest.raises(ValueError, match="must be a"):
        ZOConfig(mu=mu, lr=lr)
