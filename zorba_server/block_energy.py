"""Per-block gradient energy E[g_b^2], estimated from the scalars clients already report (pure).

A client n that perturbs the blocks A_n along z = (z_b)_{b in A_n} (independent Rademacher
parts) reports g = z . grad_A L_batch (+ O(mu) bias). Its square has the expectation

    E[g^2] = sum_{b in A_n} E[(z_b . grad_b L_batch)^2] = sum_{b in A_n} s_b,

the cross terms vanishing because distinct blocks' z are independent with mean zero; s_b =
E|grad_b L_batch|^2 is block b's gradient energy (signal and minibatch noise together). So the
mean square of one client's scalars in one round, y_n, is a noisy measurement of the sum of
s_b over its blocks: a linear model y = X s with X[n, b] = 1 when n held b. Clients with
different assignments pin down different sums, and the server solves for s >= 0 with no extra
traffic.

The solver is the multiplicative (Richardson-Lucy / EM) update for a non-negative linear model,

    s_b <- s_b x (sum_{r: b in A_r} w_r y_r / yhat_r) / (sum_{r: b in A_r} w_r),
    yhat_r = sum_{b in A_r} s_b,

started from a prior proportional to each block's parameter count (the same energy per
parameter everywhere) and scaled to the data. It keeps s >= 0, it moves only what the data can
tell apart (blocks always held together keep their prior proportions: with stable assignments
of nested sets, as ZorBA's scheduler gives, only the sums over the sets' differences are
identified), and it needs no tuning. Rows are weighted by their step counts (a mean of more
squares is steadier) and by DECAY per round of age, so the estimate follows a model that
learns; at most MAX_ROWS rows are kept. A restarted server starts afresh.

What the estimate is for: a client's step from its blocks' total energy (run.lr_scaling =
"energy", zorba_server/step_size.py), the status page, and a scheduler that assigns expected
progress (docs/learning.md, "Gradient energy per block"). Caveats: a report whose batches the
trust region shrank is left out when two or more of its batches were (`clipped`); one shrunk
batch among others cannot be told from the longest unshrunk one and is counted (an
under-estimate). The normalised estimator's scalars are divided by their batch's spread, so
their squares are not energies at all.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

DECAY = 0.8
"""A row's weight is multiplied by this for every round of age."""
MAX_ROWS = 256
"""Rows (one per client and round) kept for the fit."""
ITERATIONS = 200
"""Multiplicative updates per fit (each a few vector operations on <= MAX_ROWS rows)."""


@dataclass(frozen=True)
class EnergyRow:
    """One client's round: the blocks it perturbed and the mean square of its scalars."""

    round: int
    blocks: tuple[int, ...]
    mean_square: float
    steps: int


def clipped(values: Sequence[float], directions: int) -> bool:
    """The trust region shrank this report's batches: two or more batches share the largest
    step length (a shrunk batch's scalars are scaled so that its length is exactly the
    region's). Such scalars are not energies: counting them made a feedback loop under
    `energy` steps (a large step is shrunk, its small scalars lower its blocks' energy, which
    raises its step), measured on the simulator (docs/learning.md)."""
    size = max(directions, 1)
    if len(values) <= size:
        return False
    norms = [math.sqrt(math.fsum(v * v for v in values[i:i + size]))
             for i in range(0, len(values), size)]
    top = max(norms)
    return top > 0 and sum(abs(n - top) <= 1e-6 * top for n in norms) >= 2


def _row(round_: int, blocks: Sequence[int], grads: Iterable[float],
         directions: int) -> EnergyRow | None:
    """One report's row (None: no scalars or blocks, or `clipped`)."""
    # Plain floats, not numpy: a report holds a few dozen scalars, and numpy's per-call cost
    # on arrays that small was a tenth of the server's CPU at 1,000 clients a round.
    values = [v for v in map(float, grads) if math.isfinite(v)]
    if not len(blocks) or not values or clipped(values, directions):
        return None
    return EnergyRow(round_, tuple(sorted(set(blocks))),
                     math.fsum(v * v for v in values) / len(values), len(values))


class BlockEnergy:
    """Running estimate of every block's gradient energy s_b (see the module docstring)."""

    def __init__(self, block_params: Sequence[int]) -> None:
        if not block_params or min(block_params) <= 0:
            raise ValueError("every block needs a positive parameter count")
        self.block_params = tuple(int(p) for p in block_params)
        self.rows: deque[EnergyRow] = deque(maxlen=MAX_ROWS)
        self._cache: np.ndarray | None = None

    def observe(self, round_: int, blocks: Sequence[int], grads: Sequence[float],
                directions: int = 1) -> None:
        """Book one report's scalars, measured in batches of `directions` (a report without
        scalars or blocks adds nothing, nor does one the trust region shrank: `clipped`)."""
        self.observe_round(round_, [(blocks, grads)], directions)

    def observe_round(self, round_: int, reports: Sequence[tuple[Sequence[int], Iterable[float]]],
                      directions: int = 1) -> None:
        """Book a round's reports ((blocks, scalars) each) in their order, as `observe` would
        one by one. Only the last MAX_ROWS rows are kept, so the reports before those are
        not looked at: at 1,000 clients a round, most of a round's reports."""
        rows: list[EnergyRow] = []
        for blocks, grads in reversed(reports):
            row = _row(round_, blocks, grads, directions)
            if row is not None:
                rows.append(row)
                if len(rows) == MAX_ROWS:
                    break
        if rows:
            self.rows.extend(reversed(rows))
            self._cache = None

    def estimate(self) -> np.ndarray:
        """s_b for every block (float64); the prior's proportions scaled to the data where no
        row tells blocks apart, zeros before any row."""
        if self._cache is None:
            self._cache = self._fit()
        return self._cache.copy()

    def total(self, blocks: Sequence[int]) -> float:
        """The estimated E[g^2] of a client perturbing `blocks`: the sum of their energies."""
        return float(self.estimate()[list(blocks)].sum())

    def _fit(self) -> np.ndarray:
        prior = np.asarray(self.block_params, dtype=np.float64)
        if not self.rows:
            return np.zeros_like(prior)
        latest = self.rows[-1].round
        design = np.zeros((len(self.rows), len(prior)))
        y = np.empty(len(self.rows))
        w = np.empty(len(self.rows))
        for i, row in enumerate(self.rows):
            design[i, list(row.blocks)] = 1.0
            y[i] = row.mean_square
            w[i] = row.steps * DECAY ** (latest - row.round)
        s = prior * float(w @ y) / max(float(w @ (design @ prior)), 1e-300)
        held = design.T @ w  # each block's total row weight
        for _ in range(ITERATIONS):
            fitted = design @ s
            ratio = np.divide(y, fitted, out=np.ones_like(y), where=fitted > 0)
            s = np.where(held > 0, s * (design.T @ (w * ratio)) / np.where(held > 0, held, 1.0), s)
        # A block no client has held keeps the prior's energy per parameter of the fit.
        seen = held > 0
        if seen.any() and not seen.all():
            per_param = s[seen].sum() / prior[seen].sum()
            s[~seen] = prior[~seen] * per_param
        return s
