"""Per-block signal share rho_b = G_b / s_b, from pairs of scalars clients already report (pure).

Under the default shared pool slices every client of a round measures a prefix of one list of
pool indices, so two clients n and m often measure the same index k: the same direction z[k, b]
on every block they both hold, each on its own batch. Their scalars g_n = z . grad_{A_n} L_n and
g_m = z . grad_{A_m} L_m then have the expectation

    E[g_n g_m] = sum_{b in A_n & A_m} E[grad_b L_n . grad_b L_m] = sum_{b in A_n & A_m} G_b,

since the parts of z on blocks only one of them holds are independent with mean zero, and the
two batches' noise is independent: the product measures the signal G_b = |grad_b L|^2 (the
gradient the batches agree on) of the blocks they share, where one client's mean square
measures the energy s_b = G_b + noise (zorba_server/block_energy.py). With non-IID clients it
is the product of their mean gradients: the part of the signal they agree on, which is what a
shared step can use.

The model is linear in rho_b = G_b / s_b once the energies are known:

    y_r = sum_{b in I_r} rho_b s_b + e_r,   Var(e_r) ~ E[g_n^2] E[g_m^2] / (products in r),

one row r per pair of clients and round (I_r the blocks they share, y_r the mean of their
products over the indices both measured). A product can be negative (noise), so the
multiplicative update of block_energy.py, which needs y >= 0, does not apply; the rows are
fitted by weighted least squares with rho_b in [0, 1] (scipy's lsq_linear) and a Gaussian prior
rho_b ~ N(rho_bar, .) centred on the fleet's pooled share rho_bar = sum_r w_r y_r / sum_r w_r
sum_{b in I_r} s_b and worth PRIOR_PRODUCTS products on the block alone: with few pairs, or for
blocks the pairs do not tell apart, the estimate is the fleet's mean. The posterior standard
deviation (the bounds ignored) says how far apart two blocks must be to be told apart, which
is what the progress scheduler's ties use (zorba_server/scheduler_progress.py).

Reports the trust region shrank are left out (`block_energy.clipped`), as for the energy. At
most MAX_PAIRS pairs per round are booked, so the cost stays bounded in a large fleet; they are
taken neighbours first (clients i and i + 1 in report order, then i and i + 2, ...), so that in a
fleet of more than a dozen clients the booked pairs spread over every client instead of all
holding the first one (whose noise would then be in every row). Rows age by DECAY per round;
a restarted server starts afresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy.optimize import lsq_linear

from zorba_server.block_energy import DECAY, clipped

T = TypeVar("T")

MAX_ROWS = 512
"""Pair rows kept for the fit (one per pair of clients and round)."""
MAX_PAIRS = 64
"""Pairs booked per round at most."""
PRIOR_PRODUCTS = 8.0
"""The prior is worth this many products measuring the block alone (a typical pair's noise)."""


@dataclass(frozen=True)
class PairRow:
    """Two clients of one round that measured the same indices on some of the same blocks."""

    round: int
    blocks: tuple[int, ...]
    """The blocks both held."""
    mean_product: float
    products: int
    noise: float
    """E[g_n^2] E[g_m^2]: the variance of one product (the signal's share of it neglected)."""


@dataclass(frozen=True)
class SignalEstimate:
    rho: np.ndarray
    """(B,) signal share per block in [0, 1] (the prior's mean where nothing tells it apart)."""
    sd: np.ndarray
    """(B,) its posterior standard deviation."""
    prior: float
    """rho_bar: the fleet's pooled signal share."""
    rows: int


class BlockSignal:
    """Running estimate of every block's signal share (see the module docstring)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("need at least one block")
        self.num_blocks = num_blocks
        self.rows: deque[PairRow] = deque(maxlen=MAX_ROWS)

    def observe(self, round_: int, reports: Sequence[tuple[Sequence[int], Sequence[tuple[int, float]]]],
                directions: int = 1) -> None:
        """Book one round's reports, each (blocks held, [(pool index, scalar)])."""
        usable = []
        for blocks, steps in reports:
            values = [float(g) for _, g in steps]
            if not len(blocks) or not values or clipped(values, directions):
                continue
            scalars = {int(k): float(g) for k, g in steps if np.isfinite(g)}
            if scalars:
                usable.append((frozenset(int(b) for b in blocks), scalars))
        booked = 0
        for (blocks_n, g_n), (blocks_m, g_m) in _neighbours_first(usable):
            if booked >= MAX_PAIRS:
                break  # a thousand clients make half a million pairs: the first ones suffice
            shared_blocks, shared_k = blocks_n & blocks_m, sorted(g_n.keys() & g_m.keys())
            if not shared_blocks or not shared_k:
                continue
            a = np.array([g_n[k] for k in shared_k])
            b = np.array([g_m[k] for k in shared_k])
            noise = float(np.mean(np.square(list(g_n.values())))
                          * np.mean(np.square(list(g_m.values()))))
            if noise <= 0:
                continue
            self.rows.append(PairRow(round_, tuple(sorted(shared_blocks)), float(np.mean(a * b)),
                                     len(shared_k), noise))
            booked += 1

    def estimate(self, energy: Sequence[float] | np.ndarray) -> SignalEstimate:
        """rho_b given the blocks' energies s_b (BlockEnergy.estimate())."""
        s = np.asarray(energy, dtype=np.float64)
        if s.shape != (self.num_blocks,):
            raise ValueError(f"{s.size} energies for {self.num_blocks} blocks")
        if not self.rows or not (s > 0).any():
            return SignalEstimate(np.zeros(self.num_blocks), np.ones(self.num_blocks), 0.0,
                                  len(self.rows))
        latest = self.rows[-1].round
        design = np.zeros((len(self.rows), self.num_blocks))
        y, w = np.empty(len(self.rows)), np.empty(len(self.rows))
        for i, row in enumerate(self.rows):
            design[i, list(row.blocks)] = s[list(row.blocks)]
            y[i] = row.mean_product
            w[i] = row.products * DECAY ** (latest - row.round) / row.noise
        rho_bar = float(np.clip((w @ y) / max(float(w @ design.sum(axis=1)), 1e-300), 0.0, 1.0))
        # A product on block b alone measures rho_b s_b with variance ~ noise: the prior is worth
        # PRIOR_PRODUCTS of them at the rows' typical noise.
        typical = float(np.median([row.noise for row in self.rows]))
        # A block of no measured energy has no row either: its prior is a typical block's.
        scale = np.where(s > 0, s, float(np.mean(s[s > 0])))
        prior_w = PRIOR_PRODUCTS * scale * scale / typical
        sqrt_w, sqrt_p = np.sqrt(w), np.sqrt(prior_w)
        matrix = np.vstack([design * sqrt_w[:, None], np.diag(sqrt_p)])
        target = np.concatenate([y * sqrt_w, sqrt_p * rho_bar])
        rho = lsq_linear(matrix, target, bounds=(0.0, 1.0)).x
        precision = matrix.T @ matrix
        sd = np.sqrt(np.clip(np.diag(np.linalg.pinv(precision)), 0.0, None))
        return SignalEstimate(rho, sd, rho_bar, len(self.rows))


def _neighbours_first(items: Sequence[T]) -> Iterator[tuple[T, T]]:
    """Every unordered pair of `items` once, by distance in the sequence: (0, 1), (1, 2), ...,
    then (0, 2), (1, 3), ...: any prefix of it spreads over all the items."""
    for distance in range(1, len(items)):
        for first in range(len(items) - distance):
            yield items[first], items[first + distance]
