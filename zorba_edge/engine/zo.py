"""Seeded zeroth-order steps over the assigned blocks (MeZO's SPSA, per block).

    perturb +mu z  ->  forward  ->  perturb -2 mu z  ->  forward  ->  perturb (mu - lr g) z
    g = (L+ - L-) / (2 mu)          (the projected gradient: the only thing reported)

The last move restores theta and takes the local step theta[A] -= lr * g * z in one pass
(so later steps see it). z[k] is hashed once per step and kept packed, one bit per
parameter (`Direction`), never stored as numbers, so a step needs inference memory only.
The round-end revert (zorba_edge.engine.snapshot) restores the assigned blocks bit-exactly,
so the next sync starts from the global model rather than from this client's local trajectory.

Estimators over n directions k_1..k_n on one batch (`zo_step` is the antithetic one, n = 1).
Between two forwards theta makes one pass (`move_`): the one-sided estimator goes from
theta + mu z_i to theta + mu z_(i+1) in one exact difference, and its local step restores
theta and adds the n updates in one more (n + 1 passes for n + 1 forwards).
Each reports (k_i, g_i) and moves theta by -(lr / n) * sum_i g_i z_i: the 1/n is the client's,
so the server, which adds lr * g per reported scalar, must divide by n to aggregate:

    antithetic   2n forwards   g_i = (L(theta + mu z_i) - L(theta - mu z_i)) / (2 mu)
    one-sided    n+1 forwards  g_i = (L(theta + mu z_i) - L(theta)) / mu
    normalised   n+1 forwards  g_i = (L(theta + mu z_i) - L(theta)) / sigma, sigma the standard
                               deviation of the n differences (FZOO): a step of fixed size
                               whatever the loss's scale, so lr is not comparable to the others.

The trust region (`ZOConfig.max_move`; the run's `trust_radius` x the RMS of the perturbed
weights): a batch's step -(lr / n) sum_i g_i z_i moves each perturbed parameter by a
root-mean-square lr/n sqrt(sum_i g_i^2) (z is +-1 everywhere, distinct z nearly orthogonal).
A step longer than `max_move` is scaled down to it, its reported scalars with it: what the
server adds is what theta moved. A random direction carries the gradient along one of
millions of dimensions, so a zeroth-order step is far longer than a gradient step of the same
first-order progress, and its curvature cost grows with its length; bounding the length
relative to the weights is what one `lr` cannot do across models (Gemma 3's projected
gradients are ~60x SmolLM2's, its weights ~5x smaller). Within the region nothing changes
(docs/learning.md, "The trust region").

The label readout (block R, zorba_edge/model/readout.py) is not perturbed through the body: a
direction on its rows leaves every hidden state as it was, so one forward's head inputs
(`record_first_forward`) give the loss of any rows. `readout_estimate` runs the one-sided
estimator above on the rows, every loss from that record (no forward), with its own lr and
trust region (the rows' RMS): n readout directions per batch cost nothing but a product of the
hidden states with the rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zorba_common.errors import InvalidScalarError
from zorba_common.run_defaults import ANTITHETIC, NORMALISED, ONE_SIDED
from zorba_common.scalars import check_scalar
from zorba_edge.data.batches import ClassificationBatch
from zorba_edge.engine.directions import BlockTensors, Direction, Term, move_
from zorba_edge.engine.losses import cached_classification_loss
from zorba_edge.model.readout import HeadCall, LabelReadout

MIN_DIRECTIONS = {NORMALISED: 2}
"""Fewest directions a batch of each estimator measures (a spread needs two): the trainer
stops before a shorter batch, and the estimator refuses one."""


def forwards_per_step(estimator: str, directions: int) -> float:
    """Forward passes per local step (one pool index, one reported scalar) of a full batch:
    2 antithetic, (n + 1) / n for the estimators whose n directions share one unperturbed
    forward (the table at the top of this module)."""
    if estimator == ANTITHETIC:
        return 2.0
    return (directions + 1) / directions


LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""loss_fn(model, batch) -> scalar loss tensor."""


@dataclass(frozen=True)
class ZOConfig:
    """Hyper-parameters of the local zeroth-order steps."""

    mu: float = 1e-3
    """Perturbation scale of the two-point estimate."""
    lr: float = 1e-6
    """Local learning rate: theta -= lr * g * z."""
    max_abs_scalar: float = 1e6
    """A projected gradient beyond this is treated as divergence and refused (the run's limit,
    zorba_common/scalars.py)."""
    max_move: float = 0.0
    """Longest RMS move per perturbed parameter one batch's step may make; a longer step is
    scaled down to it (0: no limit). See the module docstring."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ValueError(f"mu must be a positive finite number, got {self.mu!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a non-negative finite number, got {self.lr!r}")
        if not (math.isfinite(self.max_move) and self.max_move >= 0):
            raise ValueError(f"max_move must be a non-negative finite number, got {self.max_move!r}")

    @staticmethod
    def for_round(lr: float, mu: float, directions: int, trust_radius: float,
                  blocks: BlockTensors, max_abs_scalar: float) -> ZOConfig:
        """The local steps' settings for a round: the client's side of the step size, whose
        server side is zorba_server/step_size.py. `lr` is what the server told this client
        (it adds lr x g per scalar); the estimators move theta by (lr' / n) sum g_i z_i, so
        lr' = lr x n. The trust region is `trust_radius` x the RMS of the blocks' weights,
        which only the client holds."""
        return ZOConfig(mu=mu, lr=lr * directions, max_abs_scalar=max_abs_scalar,
                        max_move=trust_radius * weight_scale(blocks) if trust_radius > 0 else 0.0)


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


@dataclass(frozen=True)
class Estimate:
    """What an estimator measured over its n directions, in the order taken."""

    steps: tuple[tuple[int, float], ...]
    """(k_i, g_i): the scalars to report; theta moved by -(lr / n) * sum_i g_i z[k_i]."""
    losses: tuple[tuple[float, float], ...]
    """(L(theta + mu z_i), L(theta - mu z_i)) antithetic, (L(theta + mu z_i), L(theta)) one-sided."""
    forwards: int
    spread: float | None = None
    """The normalised estimator's sigma; None for the others."""
    unperturbed: float | None = None
    """L(theta), measured by the one-sided estimators."""
    shrink: float = 1.0
    """What the trust region multiplied this batch's scalars by (1.0: the step was within it)."""

    @property
    def loss(self) -> float:
        """The batch's loss: L(theta) where measured, else the mean of the two sides over the
        directions (an O(mu^2) estimate of it)."""
        if self.unperturbed is not None:
            return self.unperturbed
        return sum(0.5 * (plus + minus) for plus, minus in self.losses) / len(self.losses)


@torch.no_grad()
def antithetic_estimate(
    model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batch: Any, run_seed: int,
    ks: Sequence[int], config: ZOConfig,
) -> Estimate:
    """Two-sided differences along each z[k_i] (2n forwards), then the local step."""
    mu, losses = config.mu, []
    z: Direction | None = None
    for k in _checked(ks):
        step = Direction(blocks, run_seed, k)
        if z is None:
            step.add_(mu)
        else:  # from theta - mu z_prev: restoring it and moving along z_k is one pass over theta
            move_([Term(mu, z), Term(mu, step)])
        z = step  # z_prev's bits go: one direction held during the forwards
        plus = float(loss_fn(model, batch))
        z.add_(-2.0 * mu)
        losses.append((plus, float(loss_fn(model, batch))))
    grads, shrink = trusted([(plus - minus) / (2.0 * mu) for plus, minus in losses], config)
    _local_step(blocks, run_seed, ks, grads, config, last=z, undo=mu)
    return Estimate(tuple(zip(ks, grads, strict=True)), tuple(losses), 2 * len(ks),
                    shrink=shrink)


@torch.no_grad()
def one_sided_estimate(
    model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batch: Any, run_seed: int,
    ks: Sequence[int], config: ZOConfig, normalise: bool = False,
) -> Estimate:
    """n directions sharing one unperturbed forward (n + 1 forwards), then the local step.

    With `normalise`, g_i is divided by the standard deviation of the n loss differences
    instead of by mu (FZOO's step-size adaptation); that needs n >= 2. A zero spread (a flat
    loss) gives g = 0.
    """
    if normalise and len(ks) < MIN_DIRECTIONS[NORMALISED]:
        raise ValueError(f"the normalised estimator needs at least {MIN_DIRECTIONS[NORMALISED]} "
                         f"directions, got {len(ks)}")
    base, mu, losses = float(loss_fn(model, batch)), config.mu, []
    z: Direction | None = None
    for k in _checked(ks):
        step = Direction(blocks, run_seed, k)
        if z is None:
            step.add_(mu)
        else:  # theta + mu z_prev -> theta + mu z_k in one pass and one rounding (see `Term`)
            move_([Term(mu, step, z)])
        z = step  # z_prev's bits go: one direction held during the forwards
        losses.append((float(loss_fn(model, batch)), base))
    diffs = [plus - base for plus, _ in losses]
    spread = _stdev(diffs) if normalise else None
    grads = [d / spread if spread else 0.0 for d in diffs] if normalise else [d / mu for d in diffs]
    grads, shrink = trusted(grads, config)
    _local_step(blocks, run_seed, ks, grads, config, last=z, undo=-mu)
    return Estimate(tuple(zip(ks, grads, strict=True)), tuple(losses), len(ks) + 1, spread, base,
                    shrink)


def trusted(grads: Sequence[float], config: ZOConfig) -> tuple[list[float], float]:
    """`grads` scaled into the trust region, and the factor used (see the module docstring).

    Non-finite values pass through unchanged: `_local_step` refuses them with its own message.
    """
    move = config.lr / len(grads) * math.sqrt(sum(g * g for g in grads))
    if config.max_move <= 0 or not math.isfinite(move) or move <= config.max_move:
        return list(grads), 1.0
    shrink = config.max_move / move
    return [g * shrink for g in grads], shrink


def weight_scale(blocks: BlockTensors) -> float:
    """RMS of the blocks' matrices (norms and biases are few and on another scale; all tensors
    where there is no matrix), to 4 significant digits so that every side that holds the same
    weights gets the same value whatever its thread count. Accumulated in float64 (where each
    fp32 square is exact) by the norm's reduction, over a float64 copy of one tensor at a time:
    squaring that copy into another, then summing, took twice as long (118 ms against 52 for
    SmolLM2's 30 blocks on one busy core, where a step took about 2 s)."""
    tensors = [t for pairs in blocks.values() for _, t in pairs]
    matrices = [t for t in tensors if t.dim() >= 2] or tensors
    count = sum(t.numel() for t in matrices)
    if not count:
        return 0.0
    squares = math.fsum(float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
                        for t in matrices)
    return float(f"{math.sqrt(squares / count):.4g}")


def _stdev(values: Sequence[float]) -> float:
    """Sample standard deviation; NaN in, NaN out (then refused as a scalar)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _checked(ks: Sequence[int]) -> Sequence[int]:
    if not ks:
        raise ValueError("an estimate needs at least one direction (pool index), got none")
    return ks


def _local_step(
    blocks: BlockTensors, run_seed: int, ks: Sequence[int], grads: Sequence[float],
    config: ZOConfig, last: Direction | None, undo: float,
) -> None:
    """Undo the last perturbation (`undo` along z[k_n]) and move theta by -(lr/n) sum g_i z_i.

    A refused scalar leaves theta restored (up to the perturbations' roundings) and unstepped.
    """
    if last is None:  # `_checked` refused an empty ks before any move
        raise ValueError("an estimate needs at least one direction (pool index), got none")
    try:
        for k, g in zip(ks, grads, strict=True):
            check_scalar(g, config.max_abs_scalar, f"projected gradient at k={k}")
    except InvalidScalarError:
        last.add_(undo)
        raise
    scale = config.lr / len(ks)
    if len(ks) == 1:
        last.add_(undo - scale * grads[0])  # restore and step in one pass, one rounding
        return
    # One pass over theta for the whole step, the directions before the last hashed again a
    # block at a time (holding them all would cost their bits, one per parameter each).
    move_([Term(-scale * g, Direction(blocks, run_seed, k, held=False))
           for k, g in zip(ks[:-1], grads[:-1], strict=True)]
          + [Term(undo - scale * grads[-1], last)])  # restore and step in one rounding


Estimator = Callable[..., Estimate]
"""estimate(model, blocks, loss_fn, batch, run_seed, ks, config) -> Estimate"""


def zo_step(
    model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batch: Any, run_seed: int, k: int,
    config: ZOConfig,
) -> StepResult:
    """Estimate the projected gradient along z[k] and take the local step."""
    estimate = antithetic_estimate(model, blocks, loss_fn, batch, run_seed, [k], config)
    (_, grad), = estimate.steps
    (loss_plus, loss_minus), = estimate.losses
    return StepResult(k=k, projected_grad=grad, loss_plus=loss_plus, loss_minus=loss_minus)


@torch.no_grad()
def projected_gradient(
    model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batch: Any, run_seed: int, k: int,
    mu: float,
) -> tuple[float, float]:
    """(L(theta + mu z), L(theta - mu z)) with no step; theta is restored before returning."""
    z = Direction(blocks, run_seed, k)
    z.add_(mu)
    loss_plus = float(loss_fn(model, batch))
    z.add_(-2.0 * mu)
    loss_minus = float(loss_fn(model, batch))
    z.add_(mu)
    return loss_plus, loss_minus


@torch.no_grad()
def normalised_estimate(
    model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batch: Any, run_seed: int,
    ks: Sequence[int], config: ZOConfig,
) -> Estimate:
    """`one_sided_estimate` normalised by the spread of its differences (FZOO)."""
    return one_sided_estimate(model, blocks, loss_fn, batch, run_seed, ks, config, normalise=True)


def record_first_forward(loss_fn: LossFn, readout: LabelReadout) -> tuple[LossFn, list[HeadCall]]:
    """`loss_fn`, recording the readout's head calls during its first call only, and the list
    they go to. An estimator's first forward is the one-sided estimators' unperturbed L0; the
    antithetic estimator's is L(theta + mu z_1), the body perturbed by mu along its first
    direction (an O(mu) difference the readout's scalars then carry)."""
    calls: list[HeadCall] = []
    first = [True]

    def recorded(model: nn.Module, batch: Any) -> torch.Tensor:
        if not first[0]:
            return loss_fn(model, batch)
        first[0] = False
        with readout.recording() as seen:
            value = loss_fn(model, batch)
        calls.extend(seen)
        return value

    return recorded, calls


@torch.no_grad()
def readout_estimate(readout: LabelReadout, block: int, calls: list[HeadCall],
                     batch: ClassificationBatch, run_seed: int, ks: Sequence[int],
                     config: ZOConfig) -> Estimate:
    """n directions z[k_i, block] on the readout's rows, scored from `calls` (one forward's
    head inputs, `record_first_forward`), then their local step: `one_sided_estimate` itself,
    its losses the rows against the recorded hidden states. `forwards` is 0: no model forward."""
    estimate = one_sided_estimate(
        readout, {block: readout.tensors()},
        lambda _model, b: cached_classification_loss(calls, readout, b), batch, run_seed, ks, config)
    return dataclasses.replace(estimate, forwards=0)


ESTIMATORS: dict[str, Estimator] = {ANTITHETIC: antithetic_estimate, ONE_SIDED: one_sided_estimate,
                                    NORMALISED: normalised_estimate}
"""The run settings' names (zorba_common.run_defaults.ESTIMATORS) -> their functions."""
