"""How far the global model has moved from its base, per block, and a bound on it (pure).

The trust region bounds each batch's step (zorba_edge/engine/zo.py), not their sum: on Gemma 3
270M, ~230 steps in random directions moved every trained block 16-22% from its base weights
in relative norm (up to 47%) and the exported model generated garbage (issue 26). This module
bounds the sum.

**The drift of block b.** The global block is theta0_b - sum_k alpha[k,b] z[k,b], z[k,b] a
Rademacher direction of P_b entries (+-1). Its squared distance from the base is

    |sum_k alpha_k z_k|^2 = P_b sum_k alpha_k^2 + sum_{k != j} alpha_k alpha_j (z_k . z_j).

Distinct k give independent directions, so each z_k . z_j (k != j) has mean 0 and variance
P_b: the cross term has mean 0 and standard deviation below sqrt(2 P_b) sum_k alpha_k^2.
Hence |Delta_b|^2 = P_b sum_k alpha_k^2 (1 + eps), |eps| ~ sqrt(2 / P_b): 8e-4 for a
3.5M-parameter block of SmolLM2, 1.4% for a 10,000-parameter toy. The exact value would need
every pair's Hamming distance (K^2 P_b / 2 bit operations per block); the expectation is exact
to the precision any bound needs, costs one pass over the table, and needs no weights. Relative
to the base weights, whose RMS is rms_b = |theta0_b| / sqrt(P_b), P_b cancels:

    drift_b = |theta_b - theta0_b| / |theta0_b| = sqrt(sum_k alpha[k,b]^2) / rms_b.

**The bound.** A round whose increments would take a block past `max_drift` has that block's
increments scaled by the largest s in [0, 1] that keeps it within the bound, as long as s is at
least KEEP_STEP. A block at the bound would get s ~ 0: a round's rows are fresh draws from the
pool (zorba_server/pool_indices.py), so its step is nearly orthogonal to the column and every
s > 0 lengthens it, and the block would freeze for the rest of the run. Such a block takes
KEEP_STEP of its step instead and makes room by shrinking its largest older coefficients
(those rows' increments are -alpha, or less for the last one, so the column lands on the
bound), and if the step alone is past the bound, its rows are projected onto it and every
older row goes to 0. A block past the bound (because the bound was lowered) is brought back
to it the same way. Other blocks are untouched. The result is an ordinary RoundDelta, on the
round's rows and the shrunk ones: clients need nothing new and rebuild the same table; it is
what is published, so every client and the export see the same table.

**Why KEEP_STEP = 1/2.** A coefficient's share of what the block has learned is, in
expectation, proportional to its square (alpha_k = lr g_k, and the signal in g_k is a fixed
fraction of it): at the bound, a step taken at scale s adds signal ~s |v|^2 / lr and, to stay
on the bound, removes s^2 |v|^2 of older mass carrying signal ~s^2 |v|^2 / lr. The net gain
s (1 - s) is 0 for a frozen block (s = 0) and for one whose newest step replaces as much old
content (s = 1), and largest at s = 1/2, which also shrinks a quarter of the rows s = 1 would.
Largest first because each shrunk row costs every client one more direction to rebuild (and
a value per block of downlink), and a row's signal is proportional to its square whichever
row it is; largest over all of the round's blocks, so that the blocks shrink the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from zorba_server.aggregation import RoundDelta
from zorba_server.drift_limits import Limited, describe_blocks

KEEP_STEP = 0.5
"""The share of its round's step a block at its bound still takes (module docstring: why 1/2;
0 gives the older rule, under which a block at the bound freezes)."""


def block_drift(alpha: np.ndarray, base_rms: Sequence[float]) -> np.ndarray:
    """(blocks,) |theta_b - theta0_b| / |theta0_b| for the table `alpha` (K x B: the body's
    columns, without a label readout's, `EngineState.body_alpha`)."""
    rms = np.asarray(base_rms, dtype=np.float64)
    if rms.shape != (alpha.shape[1],) or not np.all(rms > 0):
        raise ValueError(f"give one positive base RMS per block ({alpha.shape[1]}), got {rms.shape}")
    return np.sqrt(np.square(alpha, dtype=np.float64).sum(axis=0)) / rms


def _largest_step(current: float, along: float, length: float, bound: float) -> float:
    """The largest s in [0, 1] with |a + s v|^2 <= bound^2, given |a|^2 = current, a . v =
    along and |v|^2 = length; where |a| is past the bound already, the largest s that does not
    lengthen a (0 when every s > 0 does)."""
    if length <= 0 or current + 2 * along + length <= bound * bound:
        return 1.0
    if current >= bound * bound:
        return min(1.0, max(0.0, -2 * along / length))
    root = (-along + math.sqrt(along * along - length * (current - bound * bound))) / length
    return min(1.0, max(0.0, root))


def bounded(alpha: np.ndarray, change: RoundDelta, base_rms: Sequence[float], max_drift: float,
            keep_step: float = KEEP_STEP) -> tuple[RoundDelta, dict[int, Limited]]:
    """`change` limited so that no block of alpha + change drifts past `max_drift` (module
    docstring), and {block: what was done} for the blocks it limited (empty: unchanged)."""
    if max_drift <= 0 or not change.pool_indices:
        return change, {}
    rows = np.asarray(change.pool_indices, dtype=np.int64)
    values = change.values.astype(np.float64)
    limited: dict[int, Limited] = {}
    moves: dict[int, tuple[np.ndarray, dict[int, float]]] = {}
    """Block -> (increments on the round's rows, {older row: increment})."""
    order: np.ndarray | None = None
    """The older rows, largest first over every block of the round (computed when needed)."""
    for j, b in enumerate(change.blocks):
        if b >= len(base_rms):
            continue  # the label readout's column: not a block with base weights to drift from
        column, step = alpha[:, b].astype(np.float64), values[:, j]
        bound = max_drift * float(base_rms[b])
        s = _largest_step(float(column @ column), float(column[rows] @ step), float(step @ step),
                          bound)
        if s >= 1.0:
            continue
        if s >= keep_step:
            limited[b] = Limited(s)
            moves[b] = (step * s, {})
            continue
        if order is None:
            order = _older_rows(alpha, rows, change.blocks, base_rms, max_drift)
        fit, older = _make_room(column, order, column[rows] + keep_step * step, bound)
        limited[b] = Limited(keep_step, len(older))
        # Unprojected, the rows take the step's share itself (no rounding through alpha).
        moves[b] = (keep_step * step if fit == 1.0 else
                    fit * (column[rows] + keep_step * step) - column[rows], older)
    if not limited:
        return change, {}
    extra = sorted({k for _, older in moves.values() for k in older})
    out = np.zeros((len(rows) + len(extra), len(change.blocks)), dtype=np.float64)
    out[:len(rows)] = values
    at = {k: len(rows) + i for i, k in enumerate(extra)}
    for j, b in enumerate(change.blocks):
        if b in moves:
            on_rows, older = moves[b]
            out[:len(rows), j] = on_rows
            for k, increment in older.items():
                out[at[k], j] = increment
    return RoundDelta(change.pool_indices + tuple(extra), change.blocks, out.astype(np.float32)), limited


def _older_rows(alpha: np.ndarray, rows: np.ndarray, blocks: Sequence[int],
                base_rms: Sequence[float], max_drift: float) -> np.ndarray:
    """The rows outside the round's, by their squared share of the bound summed over the
    round's blocks, largest first: one order for every block, so that blocks making room pick
    the same rows and the delta grows by few rows (each costs every client a value per block)."""
    body = [b for b in blocks if b < len(base_rms)]
    bounds = max_drift * np.asarray([base_rms[b] for b in body], dtype=np.float64)
    share = np.square(alpha[:, body].astype(np.float64) / bounds).sum(axis=1)
    share[rows] = 0.0
    candidates = np.flatnonzero(share > 0)
    return candidates[np.argsort(-share[candidates], kind="stable")]


def _make_room(column: np.ndarray, order: np.ndarray, touched: np.ndarray,
               bound: float) -> tuple[float, dict[int, float]]:
    """With `touched` the new values on the round's rows: the factor to scale them by (1
    unless they alone are past the bound) and {older row: increment} that put the column on
    the bound: the rows of `order` (the others) go to 0 in that order, the last one needed
    only part of the way, or all of them where `touched` alone is past the bound."""
    candidates = order[column[order] != 0]
    room = bound * bound - float(touched @ touched)
    if room <= 0:
        return bound / math.sqrt(float(touched @ touched)), {int(k): -float(column[k]) for k in candidates}
    excess = float(column[candidates] @ column[candidates]) - room
    older: dict[int, float] = {}
    for k in candidates:
        if excess <= 0:
            break
        mass = float(column[k]) ** 2
        if mass <= excess:
            older[int(k)] = -float(column[k])
        else:  # part of the way: this row keeps what the bound leaves room for
            older[int(k)] = math.copysign(math.sqrt(mass - excess), column[k]) - float(column[k])
        excess -= mass
    return 1.0, older


def describe(limited: dict[int, Limited], max_drift: float) -> str:
    """One line for the round's message and the status page."""
    return (f"the drift bound (run.max_drift = {max_drift:g} of each block's base norm) "
            f"{describe_blocks(limited)}")
