"""How far the run may move the model: the rise of its generic-text loss under random moves.

A zeroth-order run moves each block along random directions: the gradient's share of a
direction is tiny, so nearly all of a block's displacement from its base weights is a random
perturbation. A client's step moves every parameter of every block it holds by the same
+-alpha (one scalar per direction), so after a run block b's parameters have moved by an RMS of
s_b = sqrt(sum_k alpha[k,b]^2) each (zorba_server/drift.py), the same for every block a client
trained, whatever the block's own weight scale. The generic-text loss (zorba_edge/engine/
fluency.py) under a random move of RMS s per parameter on every block rises, to second order, by

    L(theta0 + s z) - L(theta0) ~ s g.z + s^2 z^T H z / 2,

and with the antithetic pair (+s z, -s z) the first-order term cancels exactly:
(L+ + L-) / 2 - L0 = s^2 z^T H z / 2 + O(s^4). Relative to L0 and s^2 that is the model's
*fluency curvature* kappa: the generic-text loss is expected to rise by a fraction kappa s^2
when every block has moved an RMS of s per parameter in random directions. The server turns
the clients' kappa into the largest move it lets any block make (zorba_server/drift_budget.py).

Why a move per parameter, not relative to each block's weights: Gemma 3's blocks hold norm
weights of 1 to 14 beside matrices of RMS 0.02-0.04, so a block's RMS (what run.max_drift is
relative to) is its norms' and differs 3x between blocks, while a run moves every entry alike;
measured on the run of docs/learning.md ("Safety of the defaults"), version 1 had moved every
block by the same 2.3e-3 per parameter while its relative drifts ranged 0.0005-0.013.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from zorba_edge.data.batches import LMBatch
from zorba_edge.engine.fluency import generic_loss
from zorba_edge.model.base_rms import tensors_rms

PROBE_RADIUS = 0.02
"""The probe's first move per parameter, as a fraction of the RMS of all blocks' weights; it is
halved while the rise is past the quadratic regime (MAX_QUADRATIC_RISE)."""
PROBE_DIRECTIONS = 2
"""Antithetic pairs per radius: the quadratic form of a direction over millions of parameters
concentrates on its mean (the Hessian's trace), so a few directions agree to a few percent."""
MAX_QUADRATIC_RISE = 0.1
"""A mean relative rise above this is past the quadratic regime: the probe measures again at a
smaller move (at most MAX_ATTEMPTS times)."""
MAX_ATTEMPTS = 4
"""Smaller moves tried after the first."""


@dataclass(frozen=True)
class ProbeSettings:
    """Everything `probe` takes besides the model and batch: with them, its result is fixed
    (a client keeps it across start-ups under a key of these, zorba_edge/client/state.py)."""

    radius: float = PROBE_RADIUS
    directions: int = PROBE_DIRECTIONS
    seed: int = 0
    max_rise: float = MAX_QUADRATIC_RISE
    max_attempts: int = MAX_ATTEMPTS


PROBE_SETTINGS = ProbeSettings()
"""The start-up probe's settings."""


@dataclass(frozen=True)
class DriftProbe:
    """One probe's measurements."""

    base_loss: float
    """L0: the generic-text loss of the model as loaded."""
    move: float
    """The RMS move per parameter s the rises were measured at (the last one tried)."""
    rises: tuple[float, ...]
    """Per direction: ((L+ + L-) / 2 - L0) / L0 at `move`."""

    @property
    def curvature(self) -> float:
        """kappa = the mean relative rise / s^2 (>= 0: a mean below zero, rounding on a model
        the move does not hurt, is reported as 0)."""
        return max(0.0, statistics.fmean(self.rises) / self.move ** 2)


def perturb_(params: Sequence[torch.Tensor], step: float, seed: int) -> None:
    """Add step x z to every parameter in place, z Rademacher (+-1) regenerated from `seed`
    (the same seed gives the same direction: +s, -2s, +s returns to the start up to rounding)."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        z = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)
        p.data.add_(z.to(p.dtype).to(p.device).mul_(2).sub_(1), alpha=step)


@torch.no_grad()
def probe(model: nn.Module, params: Sequence[torch.Tensor], batch: LMBatch, *,
          radius: float = PROBE_RADIUS, directions: int = PROBE_DIRECTIONS, seed: int = 0,
          max_rise: float = MAX_QUADRATIC_RISE, max_attempts: int = MAX_ATTEMPTS) -> DriftProbe:
    """The fluency curvature of `model` on `batch` (zorba_edge.engine.fluency.generic_batch),
    moving all of `params` (every block's, held in a float dtype) at once. The first move per
    parameter is `radius` x the RMS of their weights; 1 + 2 x
    `directions` forwards per move tried. The parameters are back at their values up to
    rounding afterwards."""
    if directions < 1 or radius <= 0:
        raise ValueError("the probe needs at least one direction and a radius > 0")
    base = generic_loss(model, batch)
    move = radius * tensors_rms(params)
    for attempt in range(max_attempts + 1):
        rises = []
        for d in range(directions):
            direction_seed = seed * 1_000_003 + attempt * 1009 + d
            perturb_(params, move, direction_seed)
            plus = generic_loss(model, batch)
            perturb_(params, -2 * move, direction_seed)
            minus = generic_loss(model, batch)
            perturb_(params, move, direction_seed)
            rises.append(((plus + minus) / 2 - base) / base)
        mean = statistics.fmean(rises)
        if mean <= max_rise or attempt == max_attempts:
            return DriftProbe(base, move, tuple(rises))
        # Past the quadratic regime: try the move the quadratic law puts at half of max_rise
        # (at most half this one), which saves Gemma 3 two of its ~25 s rounds of forwards.
        move *= min(0.5, math.sqrt(max_rise / 2 / mean))
    raise AssertionError("unreachable")
