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
increments scaled by the largest s in [0, 1] that keeps it within the bound (a block already
past it, because the bound was lowered, may only move in a way that does not lengthen its
drift). Other blocks are untouched. The scaled round is what is published, so every client and
the export see the same table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from zorba_server.aggregation import RoundDelta


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


def bounded(alpha: np.ndarray, change: RoundDelta, base_rms: Sequence[float],
            max_drift: float) -> tuple[RoundDelta, dict[int, float]]:
    """`change` with each block's increments scaled so that no block of alpha + change drifts
    past `max_drift`, and {block: scale} for the blocks it scaled (empty: unchanged)."""
    if max_drift <= 0 or not change.pool_indices:
        return change, {}
    rows = list(change.pool_indices)
    values = change.values.astype(np.float64)
    scales: dict[int, float] = {}
    for j, b in enumerate(change.blocks):
        if b >= len(base_rms):
            continue  # the label readout's column: not a block with base weights to drift from
        column, step = alpha[:, b].astype(np.float64), values[:, j]
        s = _largest_step(float(column @ column), float(column[rows] @ step), float(step @ step),
                          max_drift * float(base_rms[b]))
        if s < 1.0:
            scales[b] = s
    if not scales:
        return change, {}
    factor = np.array([scales.get(b, 1.0) for b in change.blocks], dtype=np.float64)
    return RoundDelta(change.pool_indices, change.blocks,
                      (values * factor[None, :]).astype(np.float32)), scales


def describe(scales: dict[int, float], max_drift: float) -> str:
    """One line for the round's message and the status page."""
    shown = ", ".join(f"{b} x{s:.2f}" for b, s in sorted(scales.items())[:6])
    more = f" and {len(scales) - 6} more" if len(scales) > 6 else ""
    return (f"the drift bound (run.max_drift = {max_drift:g} of each block's base norm) scaled "
            f"this round's increments on block(s) {shown}{more}")
