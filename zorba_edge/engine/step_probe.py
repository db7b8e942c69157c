"""How large a step the task's loss rewards: a start-up probe of its gradient and curvature.

A batch's step over n directions moves theta by -lr sum_i g_i z_i (lr the run's, per reported
scalar), with g_i ~ z_i . G (G the batch's gradient, z Rademacher). To second order in the step,
and taking expectations over z and the batch (docs/learning.md, "The step from a start-up
probe"),

    E[dL] ~ -n lr E[g_A g_B] + (n lr^2 / 2) E[g^2] E[z^T H z],

where E[g_A g_B] = |grad L|^2 is the task's signal (the same direction measured on two
independent batches A and B: their noise is independent, so only the common gradient
survives the product), E[g^2] the signal plus the batch's noise, and E[z^T H z] the curvature
along a random direction (the Hessian's trace). The best lr is E[g_A g_B] / (E[g^2]
E[z^T H z]); the server turns the clients' measurements into the run's step
(zorba_server/step_rule.py).

Every quantity comes from antithetic triples: per direction z and batch,
g = (L(theta + s z) - L(theta - s z)) / (2 s) and z^T H z = (L+ - 2 L0 + L-) / s^2. The move s
is PROBE_MOVE x the RMS of the blocks' matrices, the length of the longest step a batch may
take at the default trust radius: a quadratic measured at the training's mu (1e-3 per
parameter) says nothing of the loss a step of that length meets, and the curvature at the
step's own scale is what the bound needs. Cost: 2 (1 + 2 x directions) forwards on the
client's own training batches, every block held at the training precision.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zorba_common.messages import TaskProbe
from zorba_edge.engine.directions import BlockTensors, Direction
from zorba_edge.engine.zo import LossFn, weight_scale

PROBE_MOVE = 0.03
"""The probe's move per parameter, as a fraction of the RMS of the blocks' matrices: the
server's default trust radius (run.trust_radius), so the curvature is the one a step of the
longest allowed length meets."""
PROBE_DIRECTIONS = 8
"""Directions, each measured on both batches. The signal estimate is a product of two
projections, whose spread over z is ~2x its mean where half of E[g^2] is signal: 8 directions
give it to ~+-75%, which the server's median over clients and its safety factor absorb."""


@dataclass(frozen=True)
class StepProbe:
    """One probe: what the client sends (`measured`) and what it cost."""

    measured: TaskProbe
    move: float
    """The move per parameter s the triples were measured at."""
    forwards: int


@torch.no_grad()
def probe(model: nn.Module, blocks: BlockTensors, loss_fn: LossFn, batches: tuple[Any, Any],
          batch_size: int, *, directions: int = PROBE_DIRECTIONS, move: float | None = None,
          seed: int = 0) -> StepProbe:
    """The task-loss probe of `model` along `directions` Rademacher directions over all of
    `blocks` (hashed as training hashes them, from `seed`), each measured on both `batches`
    (two independent training batches of `batch_size` examples). `move` defaults to
    PROBE_MOVE x the RMS of the blocks' matrices. The parameters are back at their values up
    to rounding afterwards (a caller that needs them bit-exact saves them)."""
    if directions < 1:
        raise ValueError("the task probe needs at least one direction")
    rms = weight_scale(blocks)
    s = PROBE_MOVE * rms if move is None else move
    if not (s > 0 and rms > 0):
        raise ValueError(f"the task probe needs a move > 0 and weights (RMS {rms}, move {s})")
    base = [float(loss_fn(model, b)) for b in batches]
    g2: list[float] = []
    products: list[float] = []
    curvatures: list[float] = []
    for k in range(directions):
        z = Direction(blocks, seed, k)
        z.add_(s)
        plus = [float(loss_fn(model, b)) for b in batches]
        z.add_(-2.0 * s)
        minus = [float(loss_fn(model, b)) for b in batches]
        z.add_(s)
        g = [(p - m) / (2.0 * s) for p, m in zip(plus, minus, strict=True)]
        g2.extend(x * x for x in g)
        products.append(g[0] * g[1])
        curvatures.extend((p - 2.0 * b + m) / (s * s) for p, b, m in zip(plus, base, minus, strict=True))
    measured = TaskProbe(e_g2=statistics.fmean(g2), signal=statistics.fmean(products),
                         curvature=statistics.fmean(curvatures), batch_size=batch_size,
                         weight_rms=rms)
    return StepProbe(measured, s, len(batches) * (1 + 2 * directions))

