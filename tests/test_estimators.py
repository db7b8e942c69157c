"""The multi-direction estimators on a quadratic whose gradient and curvature are known."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from zorba_common.errors import InvalidScalarError
from zorba_common.noise import block_direction
from zorba_edge.engine.snapshot import RoundSnapshot, SpilledSnapshot
from zorba_edge.engine.zo import (
    Estimate,
    ZOConfig,
    antithetic_estimate,
    one_sided_estimate,
    trusted,
    weight_scale,
)

SEED = 13


class Quadratic(nn.Module):
    """L(w, v) = 1/2 x^T A x - b^T x with x = (w, v): two "blocks" of 24 and 16 parameters."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 6, generator=gen))
        self.v = nn.Parameter(torch.randn(16, generator=gen))
        m = torch.randn(40, 40, generator=gen) / math.sqrt(40)
        self.register_buffer("a", m @ m.T + 0.1 * torch.eye(40))
        self.register_buffer("b", torch.randn(40, generator=gen))

    def x(self) -> torch.Tensor:
        return torch.cat([self.w.flatten(), self.v])

    def forward(self, batch: object = None) -> torch.Tensor:
        x = self.x()
        return 0.5 * x @ self.a @ x - self.b @ x


def loss_fn(model: nn.Module, batch: object) -> torch.Tensor:
    return model(batch)


def blocks_of(model: Quadratic) -> dict[int, list[tuple[str, torch.Tensor]]]:
    return {0: [("w", model.w)], 1: [("v", model.v)]}


def z_of(model: Quadratic, k: int) -> torch.Tensor:
    """z[k] over both blocks, in x's order."""
    parts = [
        torch.cat([t.flatten() for _, t in block_direction(
            SEED, k, b, [(n, p.shape) for n, p in tensors], dtype=torch.float32)])
        for b, tensors in blocks_of(model).items()
    ]
    return torch.cat(parts)


def gradient(model: Quadratic) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model().backward()
    grad = torch.cat([model.w.grad.flatten(), model.v.grad])
    model.zero_grad(set_to_none=True)
    return grad


def normalised(model, blocks, loss, batch, seed, ks, config) -> Estimate:
    return one_sided_estimate(model, blocks, loss, batch, seed, ks, config, normalise=True)


ESTIMATORS = {"antithetic": antithetic_estimate, "one_sided": one_sided_estimate,
              "normalised": normalised}


@pytest.mark.parametrize("name", ["antithetic", "one_sided"])
def test_each_scalar_is_the_directional_derivative_plus_the_known_curvature_term(name: str) -> None:
    # On a quadratic, (L(x + mu z) - L(x - mu z)) / 2 mu = z.grad exactly, and
    # (L(x + mu z) - L(x)) / mu = z.grad + mu/2 z^T A z: only fp32 rounding is left.
    model, mu = Quadratic(), 1e-2
    grad = gradient(model)
    ks = list(range(20))
    estimate = ESTIMATORS[name](model, blocks_of(model), loss_fn, None, SEED, ks,
                                ZOConfig(mu=mu, lr=0.0))
    for k, g in estimate.steps:
        z = z_of(model, k)
        expected = (z @ grad).item()
        if name == "one_sided":
            expected += 0.5 * mu * (z @ model.a @ z).item()
        assert abs(g - expected) < 2e-3 * (1 + abs(expected)), (k, g, expected)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_average_of_g_z_points_along_the_autograd_gradient(name: str) -> None:
    # For Rademacher z, E[(z.grad) z] = grad; with d = 40 and N = 300 directions the cosine
    # of the average with grad is ~ 1/sqrt(1 + d/N) = 0.94.
    model, mu = Quadratic(), 1e-3
    grad = gradient(model)
    ks = list(range(300))
    estimate = ESTIMATORS[name](model, blocks_of(model), loss_fn, None, SEED, ks,
                                ZOConfig(mu=mu, lr=0.0))
    average = sum(g * z_of(model, k) for k, g in estimate.steps) / len(ks)
    assert nn.functional.cosine_similarity(average, grad, dim=0).item() > 0.88
    if name == "normalised":
        # L(x + mu z) - L(x) = mu z.grad + mu^2/2 z^T A z, and the second term is ~1e-5 of the
        # first here: sigma is mu times the spread of z.grad over these directions (which is
        # |grad| = 13.5 in expectation; these 300 give 14.9), and the step is the
        # one-sided estimate scaled by mu / sigma.
        exact = torch.stack([z_of(model, k) @ grad for k in ks])
        assert estimate.spread == pytest.approx(mu * exact.std().item(), rel=1e-2)
        one_sided = (exact[:, None] * torch.stack([z_of(model, k) for k in ks])).mean(0)
        assert torch.allclose(average, one_sided * mu / estimate.spread, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_local_step_is_minus_lr_over_n_times_the_sum_of_g_z(name: str) -> None:
    model, lr = Quadratic(), 1e-2
    before = model.x().detach().clone()
    calls = []

    def counting_loss(m: nn.Module, batch: object) -> torch.Tensor:
        calls.append(1)
        return m(batch)

    ks = [3, 9, 4]
    estimate = ESTIMATORS[name](model, blocks_of(model), counting_loss, None, SEED, ks,
                                ZOConfig(mu=1e-3, lr=lr))
    expected = before - lr / len(ks) * sum(g * z_of(model, k) for k, g in estimate.steps)
    assert [k for k, _ in estimate.steps] == ks
    assert torch.allclose(model.x().detach(), expected, atol=1e-5)
    assert not torch.allclose(model.x().detach(), before, atol=1e-4)  # it did move
    assert len(calls) == estimate.forwards == (2 * len(ks) if name == "antithetic" else len(ks) + 1)


@pytest.mark.parametrize("spilled", [False, True], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_round_snapshot_reverts_every_estimator_bit_for_bit(
        name: str, spilled: bool, tmp_path: Path) -> None:
    model = Quadratic()
    blocks = blocks_of(model)
    start = model.x().detach().clone()
    snapshot = SpilledSnapshot(blocks, tmp_path) if spilled else RoundSnapshot(blocks)
    for step in range(5):
        ESTIMATORS[name](model, blocks, loss_fn, None, SEED, [2 * step, 2 * step + 1],
                         ZOConfig(mu=1e-3, lr=1e-2))
    assert not torch.equal(model.x().detach(), start)
    snapshot.revert()
    assert torch.equal(model.x().detach(), start)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_refused_scalar_leaves_theta_restored_and_unstepped(name: str) -> None:
    model = Quadratic()
    before = model.x().detach().clone()
    losses = iter([1.0, 2.0, float("nan"), 1.0, 1.0, 1.0])

    def bad_loss(m: nn.Module, batch: object) -> torch.Tensor:
        return torch.tensor(next(losses))

    with pytest.raises(InvalidScalarError, match="projected gradient at k="):
        ESTIMATORS[name](model, blocks_of(model), bad_loss, None, SEED, [0, 1],
                         ZOConfig(mu=1e-3, lr=1.0))
    eps = torch.finfo(torch.float32).eps
    assert ((model.x().detach() - before).abs() <= 4 * eps * (before.abs() + 2e-3)).all()


def test_the_normalised_estimator_needs_two_directions_and_any_estimator_one() -> None:
    model = Quadratic()
    with pytest.raises(ValueError, match="at least 2 directions"):
        normalised(model, blocks_of(model), loss_fn, None, SEED, [0], ZOConfig())
    with pytest.raises(ValueError, match="at least one direction"):
        antithetic_estimate(model, blocks_of(model), loss_fn, None, SEED, [], ZOConfig())


def test_a_flat_loss_gives_a_zero_normalised_step() -> None:
    model = Quadratic()
    before = model.x().detach().clone()
    estimate = normalised(model, blocks_of(model), lambda m, b: torch.tensor(1.0), None, SEED,
                          [0, 1, 2], ZOConfig(mu=1e-3, lr=1.0))
    assert estimate.spread == 0.0
    assert all(g == 0.0 for _, g in estimate.steps)
    eps = torch.finfo(torch.float32).eps
    assert ((model.x().detach() - before).abs() <= 2 * eps * (before.abs() + 2e-3)).all()


def test_the_trust_region_scales_a_step_down_to_its_longest_move() -> None:
    config = ZOConfig(mu=1e-3, lr=2.0, max_move=1.0)
    # move = lr / n * sqrt(sum g^2) = 2 / 2 * sqrt(9 + 16) = 5 > 1
    grads, shrink = trusted([3.0, -4.0], config)
    assert shrink == pytest.approx(0.2)
    assert grads == pytest.approx([0.6, -0.8])


def test_the_trust_region_leaves_a_short_step_a_zero_radius_and_bad_values_alone() -> None:
    assert trusted([0.1, -0.2], ZOConfig(lr=1.0, max_move=0.5)) == ([0.1, -0.2], 1.0)
    assert trusted([30.0], ZOConfig(lr=1.0, max_move=0.0)) == ([30.0], 1.0)
    nan = float("nan")
    assert trusted([nan], ZOConfig(lr=1.0, max_move=0.5))[1] == 1.0  # refused later


def test_the_weight_scale_is_the_rms_of_the_matrices() -> None:
    model = Quadratic()  # one 4 x 6 matrix, one vector of 16 (left out)
    expected = model.w.detach().double().square().mean().sqrt().item()
    assert weight_scale(blocks_of(model)) == pytest.approx(expected, rel=1e-3)
    assert weight_scale({1: [("v", model.v)]}) == pytest.approx(
        model.v.detach().double().square().mean().sqrt().item(), rel=1e-3)  # no matrix: all


def test_the_weight_scale_is_the_float64_rms_to_4_digits_whatever_the_thread_count() -> None:
    """Every side that holds the same weights (a client, the simulator, a replay) must get the
    same trust region: tensors large enough for torch to split their reduction across threads
    give the float64 RMS, rounded, with one thread and with two."""
    gen = torch.Generator().manual_seed(3)
    blocks = {b: [("w", 0.02 * torch.randn(512, 1024, generator=gen) + 0.001),
                  ("u", 0.05 * torch.randn(300, 700, generator=gen))] for b in range(2)}
    matrices = torch.cat([t.flatten().double() for pairs in blocks.values() for _, t in pairs])
    expected = float(f"{matrices.square().mean().sqrt().item():.4g}")
    threads = torch.get_num_threads()
    try:
        scales = []
        for count in (1, 2):
            torch.set_num_threads(count)
            scales.append(weight_scale(blocks))
    finally:
        torch.set_num_threads(threads)
    assert scales == [expected, expected]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_step_past_the_trust_region_moves_theta_by_its_shrunk_reported_scalars(name: str) -> None:
    ks = [3, 9, 4]

    def estimate_on_fresh_model(config: ZOConfig) -> tuple[Estimate, Quadratic]:
        model = Quadratic()
        return ESTIMATORS[name](model, blocks_of(model), loss_fn, None, SEED, ks,
                                config), model

    small, _ = estimate_on_fresh_model(ZOConfig(mu=1e-3, lr=1e-6))
    within, _ = estimate_on_fresh_model(ZOConfig(mu=1e-3, lr=1e-6, max_move=0.01))
    assert within.shrink == 1.0 and within.steps == small.steps  # inside: nothing changes
    assert all(g != 0 for _, g in small.steps)

    lr, radius = 10.0, 0.01
    before = Quadratic().x().detach().clone()
    estimate, model = estimate_on_fresh_model(ZOConfig(mu=1e-3, lr=lr, max_move=radius))
    raw, _ = estimate_on_fresh_model(ZOConfig(mu=1e-3, lr=lr))
    assert 0 < estimate.shrink < 1
    for (k, g), (k_raw, g_raw) in zip(estimate.steps, raw.steps, strict=True):
        assert k == k_raw and g == pytest.approx(g_raw * estimate.shrink)
    moved = model.x().detach() - before
    expected = -lr / len(ks) * sum(g * z_of(model, k) for k, g in estimate.steps)
    assert torch.allclose(moved, expected, atol=1e-5)
    # The RMS move is the radius, up to the directions' small overlaps.
    assert moved.square().mean().sqrt().item() == pytest.approx(radius, rel=0.3)
