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

The directions z are the run's own kind, Rademacher z[k] over every parameter of every block,
hashed and moved as training moves them (zorba_edge/engine/directions.py, the one source of the
seeded perturbation), at pool indices no run trains along (PROBE_FIRST_ROW).

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
from zorba_edge.engine.directions import BlockTensors, Direction, Term, move_
from zorba_edge.engine.fluency import generic_loss
from zorba_edge.model.base_rms import tensors_rms

PROBE_RADIUS = 0.02
"""The probe's first move per parameter, as a fraction of the RMS of all blocks' weights; it is
halved while the rise is past the quadratic regime (MAX_QUADRATIC_RISE)."""
PROBE_DIRECTIONS = 2
"""Antithetic pairs per radius: the quadratic form of a direction over millions of parameters
concentrates on its mean (the Hessian's trace). Measured on SmolLM2 over 16 directions, one
direction's value spreads ~16-19% (SD), so two give kappa to ~11-13%, which the server's median
over clients and its factor-2 marking absorb (docs/learning.md, "The probe on both models")."""
MAX_QUADRATIC_RISE = 0.1
"""A mean relative rise above this is past the quadratic regime: the probe measures again at a
smaller move (at most MAX_ATTEMPTS times)."""
MAX_ATTEMPTS = 4
"""Smaller moves tried after the first."""
PROBE_FIRST_ROW = 1 << 63
"""The pool index k of the probe's first direction z[k] (zorba_common/noise.py; the i-th
direction it measures is z[PROBE_FIRST_ROW + i]). A run moves its blocks along z[k] for its
pool rows k < run.pool_size only, and a table of 2**63 rows (8 bytes an entry) cannot exist,
so whatever the run's seed, the probe never measures along a direction the run moves along:
its curvature is that of directions independent of the run's."""


@dataclass(frozen=True)
class ProbeSettings:
    """Everything `probe` takes besides the model and batch: with them, its result is fixed
    (a client keeps it across start-ups under a key of these, zorba_edge/client/state.py).
    `seed` and `first_row` name its directions z[first_row + i] of run seed `seed`; the
    field `first_row` came with the move from a torch.Generator's directions to the run's
    (zorba_edge/engine/directions.py), so a result kept from the old directions has another
    key and is measured again, not reused."""

    radius: float = PROBE_RADIUS
    directions: int = PROBE_DIRECTIONS
    seed: int = 0
    first_row: int = PROBE_FIRST_ROW
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


@torch.no_grad()
def probe(model: nn.Module, blocks: BlockTensors, batch: LMBatch, *,
          radius: float = PROBE_RADIUS, directions: int = PROBE_DIRECTIONS, seed: int = 0,
          first_row: int = PROBE_FIRST_ROW, max_rise: float = MAX_QUADRATIC_RISE,
          max_attempts: int = MAX_ATTEMPTS) -> DriftProbe:
    """The fluency curvature of `model` on `batch` (zorba_edge.engine.fluency.generic_batch),
    moving every tensor of `blocks` (every block's, held in a float dtype) at once along the
    run's seeded directions z[first_row + i] of run seed `seed` (zorba_edge/engine/
    directions.py). The first move per parameter is `radius` x the RMS of their weights;
    1 + 2 x `directions` forwards per move tried. The parameters are back at their values up
    to rounding afterwards (2 x `directions` + 1 fp32 roundings an element per move tried; a
    caller that needs them bit for bit saves them, as the simulator does)."""
    if directions < 1 or radius <= 0:
        raise ValueError("the probe needs at least one direction and a radius > 0")
    base = generic_loss(model, batch)
    move = radius * tensors_rms(t for tensors in blocks.values() for _, t in tensors)
    for attempt in range(max_attempts + 1):
        rows = [first_row + attempt * directions + d for d in range(directions)]
        rises = _antithetic_rises(model, batch, blocks, seed, rows, move, base)
        mean = statistics.fmean(rises)
        if mean <= max_rise or attempt == max_attempts:
            return DriftProbe(base, move, tuple(rises))
        # Past the quadratic regime: try the move the quadratic law puts at half of max_rise
        # (at most half this one), which saves Gemma 3 two of its ~25 s rounds of forwards.
        move *= min(0.5, math.sqrt(max_rise / 2 / mean))
    raise AssertionError("unreachable")


def _antithetic_rises(model: nn.Module, batch: LMBatch, blocks: BlockTensors, seed: int,
                      rows: Sequence[int], move: float, base: float) -> list[float]:
    """Per direction z[k] (k in `rows`), ((L(theta + s z) + L(theta - s z)) / 2 - L0) / L0 at
    s = `move`, and theta back at the end.

    The pairs are visited as a chain, +s z_0, -s z_0, -s z_1, +s z_1, +s z_2, ...: the step
    from one direction's point to the next one's, on the same side, is s (z_next - z_this), one
    exact difference (`Term`), so each direction costs two moves instead of three (+s, -2s, +s
    back) and elements where the two directions agree are not moved at all. Each direction is
    hashed as a move reaches each block (held=False): two of them are at most one block's bits
    beside the weights, not 1/16 of them."""
    zs = [Direction(blocks, seed, k, held=False) for k in rows]
    losses: dict[tuple[int, int], float] = {}
    side = 1
    for d, z in enumerate(zs):
        # Arrive at theta + side s z_d: from theta (first) or from the last point, same side.
        move_([Term(move, z)] if d == 0 else [Term(side * move, z, zs[d - 1])])
        losses[d, side] = generic_loss(model, batch)
        move_([Term(-2 * side * move, z)])
        side = -side
        losses[d, side] = generic_loss(model, batch)
    move_([Term(-side * move, zs[-1])])
    return [((losses[d, 1] + losses[d, -1]) / 2 - base) / base for d in range(len(zs))]
