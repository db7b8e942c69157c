"""Block potential: triples on a quadratic, where E[g^2] and E[zHz] are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from zorba_edge.engine.directions import Direction
from zorba_lab.block_potential import (
    Triple,
    bootstrap_mean,
    gradient_signal,
    measure_triples,
    spearman,
    summarise,
)


class Quadratic(nn.Module):
    """L(theta) = 0.5 theta^T H theta + b . theta on two blocks of 8 and 12 parameters; the
    `batch` picks one of two linear terms, so batches differ as real minibatches do."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        # Multiples of 1/64, moved by mu = 1/8: every move is exact in fp32 (directions.py
        # rounds each step to fp32), so a triple's differences are exact up to float64.
        self.first = nn.Parameter(torch.randint(-64, 64, (8,), generator=gen).double() / 64,
                                  requires_grad=False)
        self.second = nn.Parameter(torch.randint(-64, 64, (3, 4), generator=gen).double() / 64,
                                   requires_grad=False)
        root = torch.randn(20, 20, generator=gen, dtype=torch.float64)
        self.register_buffer("hessian", root @ root.T / 20 + torch.eye(20, dtype=torch.float64))
        self.register_buffer("linear", torch.randn(2, 20, generator=gen, dtype=torch.float64))

    def theta(self) -> torch.Tensor:
        return torch.cat([self.first.flatten(), self.second.flatten()])

    def loss(self, batch: int) -> torch.Tensor:
        theta = self.theta()
        return 0.5 * theta @ self.hessian @ theta + self.linear[batch] @ theta

    def grad(self, batch: int) -> torch.Tensor:
        return self.hessian @ self.theta() + self.linear[batch]


BLOCKS = {0: slice(0, 8), 1: slice(8, 20)}


def loss_fn(model: nn.Module, batch: int) -> torch.Tensor:
    assert isinstance(model, Quadratic)
    return model.loss(batch)


def block_tensors(model: Quadratic, block: int) -> list[tuple[str, torch.Tensor]]:
    return [("weight", model.first if block == 0 else model.second)]


def direction_vector(model: Quadratic, block: int, seed: int, k: int) -> torch.Tensor:
    """z[k, block] as a full 20-vector (zero off the block)."""
    zeros = [("weight", torch.zeros_like(t)) for _, t in block_tensors(model, block)]
    Direction({block: zeros}, seed, k).add_(1.0)
    full = torch.zeros(20, dtype=torch.float64)
    full[BLOCKS[block]] = zeros[0][1].flatten()
    return full


def test_each_triple_gives_the_exact_projected_gradient_and_curvature_of_a_quadratic():
    model, mu = Quadratic(), 0.125
    batches = [0, 1]
    zero = [float(model.loss(b).detach()) for b in batches]
    for block in BLOCKS:
        triples = measure_triples(model, block, block_tensors(model, block), loss_fn, batches,
                                  zero, run_seed=7, ks=range(6), mu=mu)
        for i, triple in enumerate(triples):
            z = direction_vector(model, block, 7, i)
            assert triple.projected_gradient(mu) == pytest.approx(float(z @ model.grad(i % 2)), rel=1e-9)
            assert triple.curvature(mu) == pytest.approx(float(z @ model.hessian @ z), rel=1e-9)


def test_the_block_is_left_bit_identical_after_its_directions():
    model = Quadratic()
    before = model.second.detach().clone()
    measure_triples(model, 1, block_tensors(model, 1), loss_fn, [0], [float(model.loss(0).detach())],
                    run_seed=1, ks=range(50), mu=0.3)
    assert torch.equal(model.second.detach(), before)


def test_the_means_converge_to_the_squared_gradient_norm_and_the_block_trace():
    """Rademacher z: E[(z . grad_b)^2] = |grad_b|^2 and E[z^T H_bb z] = tr(H_bb)."""
    model, mu = Quadratic(), 0.125
    zero = [float(model.loss(0).detach())]
    rng = np.random.default_rng(0)
    for block, span in BLOCKS.items():
        triples = measure_triples(model, block, block_tensors(model, block), loss_fn, [0], zero,
                                  run_seed=3, ks=range(400), mu=mu)
        result = summarise(block, triples, mu, rng)
        g2 = float(model.grad(0)[span].square().sum())
        trace = float(model.hessian[span, span].trace())
        assert result.e_g2.low <= g2 <= result.e_g2.high
        assert result.e_zhz.low <= trace <= result.e_zhz.high
        assert result.e_g2.mean == pytest.approx(g2, rel=0.2)
        assert result.e_zhz.mean == pytest.approx(trace, rel=0.1)
        assert result.potential == pytest.approx(result.e_g2.mean / result.e_zhz.mean)


def test_a_triple_is_the_central_differences():
    triple = Triple(plus=1.5, zero=1.0, minus=0.9)
    assert triple.projected_gradient(0.1) == pytest.approx(3.0)
    assert triple.curvature(0.1) == pytest.approx(40.0)


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_values():
    rng = np.random.default_rng(1)
    few = bootstrap_mean(list(rng.normal(5, 1, 20)), np.random.default_rng(2))
    many = bootstrap_mean(list(rng.normal(5, 1, 2000)), np.random.default_rng(2))
    assert few.low < few.mean < few.high and many.low < many.mean < many.high
    assert many.high - many.low < (few.high - few.low) / 5
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([], rng)


def test_curvature_not_measured_positive_gives_no_potential():
    rng = np.random.default_rng(0)
    noisy = [Triple(1.0, 1.0, 1.0 + s) for s in (-1e-6, 1e-6, -2e-6, 2e-6)]
    assert summarise(0, noisy, 1e-3, rng).potential is None


def test_spearman_is_one_for_the_same_order_minus_one_reversed_and_handles_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal-length"):
        spearman([1, 2], [1])


def test_the_gradient_signal_separates_the_common_gradient_from_the_batches_noise():
    """Two batches whose gradients are mu + e and mu - e: the mean is mu exactly, so the
    estimate (2 |mu|^2 - mean |g_j|^2) equals |mu|^2 - |e|^2, the unbiased formula at m = 2."""
    model = Quadratic()
    stats = gradient_signal(model, {b: block_tensors(model, b) for b in BLOCKS}, loss_fn, [0, 1])
    for block, span in BLOCKS.items():
        g0, g1 = model.grad(0)[span], model.grad(1)[span]
        mean, noise = (g0 + g1) / 2, (g0 - g1) / 2
        assert stats.mean_batch_g2[block] == pytest.approx(float((g0.square().sum() + g1.square().sum()) / 2))
        assert stats.signal_g2[block] == pytest.approx(float(mean.square().sum() - noise.square().sum()))
        assert stats.fraction(block) == pytest.approx(stats.signal_g2[block] / stats.mean_batch_g2[block])
    assert not model.first.requires_grad and model.first.grad is None
    with pytest.raises(ValueError, match="at least two batches"):
        gradient_signal(model, {0: block_tensors(model, 0)}, loss_fn, [0])
