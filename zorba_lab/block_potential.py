"""What a block is worth to a zeroth-order step: E[g_b^2] and E[z_b^T H_b z_b] from triples.

One ZO step along z on block b with step eta changes the loss by about
-eta g^2 + (eta^2 / 2) g^2 z^T H z; at the best eta it removes g^2 / (2 z^T H z). So the
expected progress a direction on block b buys is set by E[g_b^2] / E[z_b^T H_b z_b]
(docs/learning.md, "What a block is worth"): its *potential*.

Both come from one antithetic triple per direction, (L+, L0, L-) at theta + mu z, theta,
theta - mu z, with z a Rademacher direction on block b alone:

    g   = (L+ - L-) / (2 mu)            the projected gradient z . grad_b   (error O(mu^2))
    zHz = (L+ - 2 L0 + L-) / mu^2       the curvature along z, z^T H_b z    (error O(mu^2))

For a quadratic loss both are exact. L0 depends on the batch only, so one unperturbed forward
per batch serves every block and direction measured on it: a triple costs two forwards.

The arithmetic (triples, bootstrap intervals, rank agreement) is pure and tested on a toy
quadratic (tests/test_block_potential.py); benchmarks/block_potential.py runs it on SmolLM2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from zorba_edge.engine.directions import BlockTensors, Direction, NamedTensors

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class Triple:
    plus: float
    zero: float
    minus: float

    def projected_gradient(self, mu: float) -> float:
        return (self.plus - self.minus) / (2 * mu)

    def curvature(self, mu: float) -> float:
        return (self.plus - 2 * self.zero + self.minus) / (mu * mu)


@dataclass(frozen=True)
class Estimate:
    """A mean and its bootstrap interval."""

    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap_mean(values: Sequence[float], rng: np.random.Generator, *, level: float = 0.9,
                   resamples: int = 2000) -> Estimate:
    """The mean of `values` with its percentile bootstrap interval at `level`."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no values to estimate a mean from")
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(float(data.mean()), float(low), float(high))


@dataclass(frozen=True)
class BlockPotential:
    block: int
    directions: int
    e_g2: Estimate
    e_zhz: Estimate

    @property
    def potential(self) -> float | None:
        """E[g^2] / E[zHz], or None where the curvature is not measured positive."""
        return self.e_g2.mean / self.e_zhz.mean if self.e_zhz.low > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {"block": self.block, "directions": self.directions,
                "e_g2": self.e_g2.mean, "e_g2_ci90": [self.e_g2.low, self.e_g2.high],
                "e_zhz": self.e_zhz.mean, "e_zhz_ci90": [self.e_zhz.low, self.e_zhz.high],
                "potential": self.potential}


def summarise(block: int, triples: Sequence[Triple], mu: float, rng: np.random.Generator) -> BlockPotential:
    g2 = [t.projected_gradient(mu) ** 2 for t in triples]
    zhz = [t.curvature(mu) for t in triples]
    return BlockPotential(block, len(triples), bootstrap_mean(g2, rng), bootstrap_mean(zhz, rng))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"rank agreement needs two equal-length lists of 2+ values, got {len(a)}, {len(b)}")

    def ranks(values: Sequence[float]) -> np.ndarray:
        data = np.asarray(values, dtype=np.float64)
        order = data.argsort(kind="stable")
        out = np.empty(len(data))
        out[order] = np.arange(len(data), dtype=np.float64)
        for value in np.unique(data):  # ties share their mean rank
            tied = data == value
            out[tied] = out[tied].mean()
        return out

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


@torch.no_grad()
def measure_triples(model: nn.Module, block: int, tensors: NamedTensors, loss_fn: LossFn,
                    batches: Sequence[Any], zero_losses: Sequence[float], run_seed: int,
                    ks: Sequence[int], mu: float) -> list[Triple]:
    """One triple per pool index in `ks`, direction i on batch i mod len(batches).

    `zero_losses[j]` is L0 on batches[j] (measured once by the caller for every block). The
    block is restored from a copy after each direction, not by a third move, so hundreds of
    directions leave it bit-identical and L0 stays the loss of the same weights.
    """
    if len(batches) != len(zero_losses) or not batches:
        raise ValueError("give one unperturbed loss per batch, and at least one batch")
    saved = [t.detach().clone() for _, t in tensors]
    triples = []
    for i, k in enumerate(ks):
        batch = batches[i % len(batches)]
        direction = Direction({block: tensors}, run_seed, k)
        direction.add_(mu)
        plus = float(loss_fn(model, batch))
        direction.add_(-2 * mu)
        minus = float(loss_fn(model, batch))
        for (_, tensor), copy in zip(tensors, saved, strict=True):
            tensor.copy_(copy)
        triples.append(Triple(plus, zero_losses[i % len(batches)], minus))
    return triples


@dataclass(frozen=True)
class GradientSignal:
    """Per block, from the autograd gradients of m batches: how much of a batch's gradient is
    the task's (the population gradient mu) and how much is the batch's own noise."""

    mean_batch_g2: dict[int, float]
    """mean_j |grad_b L(batch_j)|^2: E_z[g_b^2] averaged over the batches."""
    signal_g2: dict[int, float]
    """(m |mean_j grad_j|^2 - mean_j |grad_j|^2) / (m - 1): an unbiased estimate of |mu_b|^2
    for batches drawn independently (E|mean|^2 = |mu|^2 + E|noise|^2 / m)."""

    def fraction(self, block: int) -> float:
        return self.signal_g2[block] / self.mean_batch_g2[block]


def gradient_signal(model: nn.Module, blocks: BlockTensors, loss_fn: LossFn,
                    batches: Sequence[Any]) -> GradientSignal:
    """Backward once per batch, keeping each block's squared gradient norm and the running sum
    of the gradients (one extra copy of the blocks' parameters)."""
    if len(batches) < 2:
        raise ValueError("the signal of a gradient needs at least two batches")
    params = [p for tensors in blocks.values() for _, p in tensors]
    flags = [p.requires_grad for p in params]
    sums: dict[int, list[torch.Tensor]] = {}
    norms: dict[int, list[float]] = {b: [] for b in blocks}
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            for p in params:
                p.grad = None
            loss_fn(model, batch).backward()
            for b, tensors in blocks.items():
                grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                         for _, p in tensors]
                # Squares summed in float64 a tensor at a time; the running sums stay fp32.
                norms[b].append(float(sum(float(g.double().square().sum()) for g in grads)))
                if b not in sums:
                    sums[b] = [g.clone() for g in grads]
                else:
                    for total, g in zip(sums[b], grads, strict=True):
                        total.add_(g)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
    m = len(batches)
    mean_g2 = {b: float(np.mean(norms[b])) for b in blocks}
    of_mean = {b: sum(float((t.double() / m).square().sum()) for t in sums[b]) for b in blocks}
    signal = {b: (m * of_mean[b] - mean_g2[b]) / (m - 1) for b in blocks}
    return GradientSignal(mean_g2, signal)

