"""One seeded zeroth-order step over the assigned blocks (MeZO's SPSA, per block).

    perturb +mu z  ->  forward  ->  perturb -2 mu z  ->  forward  ->  restore +mu z
    g = (L+ - L-) / (2 mu)          (the projected gradient: the only thing reported)
    theta[A] -= lr * g * z          (the local step, so later steps see it)

z is regenerated from (run seed, pool index k, block) each time it is needed, never
stored, so a step needs inference memory only. The round-end revert restores the
assigned blocks bit-exactly from a host snapshot, so the next sync starts from the
global model rather than from this client's local trajectory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zorba_edge.engine.directions import BlockTensors, perturb_
from zorba_edge.errors import InvalidScalarError

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""loss_fn(model, batch) -> scalar loss tensor."""


@dataclass(frozen=True)
class ZOConfig:
    """Hyper-parameters of the local zeroth-order steps."""

    mu: float = 1e-3
    """Perturbation scale of the two-point estimate."""
    lr: float = 1e-6
    """Local learning rate: theta -= lr * g * z."""
    max_abs_grad: float = 1e6
    """A projected gradient beyond this is treated as divergence and refused."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"mu must be a positive finite number, got {self.mu!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a non-negative finite number, got {self.lr!r}")


@dataclass(frozen=True)
class StepResult:
    k: int
    projected_grad: float
    loss_plus: float
    loss_minus: float

    @property
    def loss(self) -> float:
        """The two-point average: an O(mu^2) estimate of the unperturbed loss."""
        return 0.5 * (self.loss_plus + self.loss_minus)


def check_scalar(value: float, what: str, limit: float) -> float:
    """Refuse NaN, infinities and values past `limit`: one bad scalar would corrupt alpha."""
    if not math.isfinite(value):
        raise InvalidScalarError(
            f"{what} is {value}: the loss diverged or overflowed; lower lr or mu, or check the data"
        )
    if abs(value) > limit:
        raise InvalidScalarError(f"{what} = {value:.4g} exceeds the limit {limit:.4g}")
    return value


@torch.no_grad()
def projected_gradient(
    model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batch: Any, run_seed: int, k: int,
    mu: float,
) -> tuple[float, float]:
    """(L(theta + mu z), L(theta - mu z)); theta is restored before returning."""
    perturb_(blocks, run_seed, k, mu)
    loss_plus = float(loss_fn(model, batch))
    perturb_(blocks, run_seed, k, -2.0 * mu)
    loss_minus = float(loss_fn(model, batch))
    perturb_(blocks, run_seed, k, mu)
    return loss_plus, loss_minus


def zo_step(
    model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batch: Any, run_seed: int, k: int,
    config: ZOConfig,
) -> StepResult:
    """Estimate the projected gradient along z[k] and take the local step."""
    loss_plus, loss_minus = projected_gradient(model, blocks, loss_fn, batch, run_seed, k, config.mu)
    grad = check_scalar(
        (loss_plus - loss_minus) / (2.0 * config.mu), f"projected gradient at k={k}",
        config.max_abs_grad,
    )
    perturb_(blocks, run_seed, k, -config.lr * grad)
    return StepResult(k=k, projected_grad=grad, loss_plus=loss_plus, loss_minus=loss_minus)


class RoundSnapshot:
    """A host-memory copy of the assigned blocks, taken at round start, for the exact revert."""

    def __init__(self, blocks: BlockTensors) -> None:
        self._blocks = blocks
        self._saved = {
            block: [tensor.detach().to("cpu", copy=True) for _, tensor in tensors]
            for block, tensors in blocks.items()
        }

    @torch.no_grad()
    def revert(self) -> None:
        """Put every assigned tensor back to its round-start value, bit for bit."""
        for block, tensors in self._blocks.items():
            for (_, tensor), saved in zip(tensors, self._saved[block], strict=True):
                tensor.copy_(saved)
