"""Turning one round's reports into alpha increments (docs/design.md §2). Pure functions, no I/O.

Mean (the default): for each pool index k and block b,

    delta[k, b] = lr * sum_{n: b in A_n} w_n * s[n, k] / sum_{n: b in A_n} w_n,
    s[n, k]     = c_n * sum_{t: k_t = k} g[n, t],

where c_n is the client's step scale (its local step was lr * c_n * g z; see
RunConfig.lr_scaling),

the sample-weighted average of the clients' local updates (FedAvg of their model deltas):
a client that trains b but took fewer steps contributes 0 for the steps it did not take.
Because alpha enters the model with a minus sign (theta = theta0 - sum alpha z) and the
client's local step is theta -= lr g z, increments are +lr * mean.

Robust modes (`trimmed_mean`, `median`) aggregate, per (k, b), the unweighted s[n, k] of
the clients that hold b *and took step k* (a client that did not take the step has no
opinion on it); scalars are clipped first when `clip` is set. A weighted median would let a
client buy influence with its sample count, which is what robust mode is meant to resist.
Each rule is a file of zorba_server/aggregation_rules/, found through its registry `RULES`.

Determinism: contributions are ordered by client id and every sum runs in a fixed order,
so the same reports give bit-identical increments whatever order they arrived in (a
restarted server recomputes exactly what an uninterrupted one would have).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from zorba_common.messages import half_exact
from zorba_server.aggregation_rules import RULES, RoundScalars
from zorba_server.config import AggregationConfig


@dataclass(frozen=True)
class Contribution:
    """One accepted report, as aggregation sees it."""

    client_id: str
    blocks: tuple[int, ...]
    weight: float
    steps: tuple[tuple[int, float], ...]
    lr_scale: float = 1.0
    """This client's step is lr x lr_scale: its scalars enter alpha scaled so."""


@dataclass(frozen=True)
class RoundDelta:
    """alpha[pool_indices[i], blocks[j]] += values[i, j]."""

    pool_indices: tuple[int, ...]
    blocks: tuple[int, ...]
    values: np.ndarray
    """float32, len(pool_indices) x len(blocks)."""


def aggregate(contributions: Sequence[Contribution], lr: float,
              config: AggregationConfig) -> RoundDelta:
    """The increments of one round; an empty delta when nothing was contributed."""
    ordered = sorted(contributions, key=lambda c: c.client_id)
    ordered = [c for c in ordered if c.blocks and c.steps and c.weight > 0]
    if not ordered:
        return RoundDelta((), (), np.zeros((0, 0), dtype=np.float32))
    # Flat arrays, one entry per (client, step) and per (client, block): no Python loop
    # over every scalar (a round of 1,000 clients x 64 steps is 64,000 of them).
    step_counts = [len(c.steps) for c in ordered]
    step_client = np.repeat(np.arange(len(ordered)), step_counts)
    # k, g, k, g, ... read at C speed (a pool index is exact in a float64).
    pairs = np.fromiter(chain.from_iterable(chain.from_iterable(c.steps for c in ordered)),
                        np.float64, 2 * sum(step_counts))
    step_k, step_g = pairs[0::2].astype(np.int64), pairs[1::2]
    if config.clip is not None:
        step_g = np.clip(step_g, -config.clip, config.clip)
    ks, step_col = np.unique(step_k, return_inverse=True)
    block_counts = [len(c.blocks) for c in ordered]
    block_client = np.repeat(np.arange(len(ordered)), block_counts)
    block_ids = np.fromiter((b for c in ordered for b in c.blocks), np.int64, sum(block_counts))
    blocks, block_col = np.unique(block_ids, return_inverse=True)

    sums = np.zeros((len(ordered), len(ks)))
    np.add.at(sums, (step_client, step_col), step_g)  # in step order: deterministic
    # Each client's local update is lr_n g z with its own lr_n = lr x lr_scale_n.
    sums *= np.array([c.lr_scale for c in ordered], dtype=np.float64)[:, None]
    took = np.zeros((len(ordered), len(ks)), dtype=bool)
    took[step_client, step_col] = True
    holds = np.zeros((len(ordered), len(blocks)), dtype=bool)
    holds[block_client, block_col] = True

    scalars = RoundScalars(sums, np.array([c.weight for c in ordered], dtype=np.float64),
                           took, holds)
    values = (lr * RULES[config.method](scalars, config)).astype(np.float32)
    return RoundDelta(tuple(int(k) for k in ks), tuple(int(b) for b in blocks), values)


def with_half_column(delta: RoundDelta, block: int | None) -> RoundDelta:
    """`delta` with column `block` (the label readout's) rounded to float16 values
    (messages.half_exact): what an applied round adds, so its published delta carries that
    column in 2 bytes a value and stays exactly what the server's table received."""
    if block is None or block not in delta.blocks:
        return delta
    values = delta.values.copy()
    column = delta.blocks.index(block)
    values[:, column] = half_exact(values[:, column])
    return RoundDelta(delta.pool_indices, delta.blocks, values)


def apply_delta(alpha: np.ndarray, delta: RoundDelta) -> np.ndarray:
    """A new table alpha + delta (float64; the delta's float32 values are exact in it)."""
    out = alpha.copy()
    if delta.pool_indices:
        out[np.ix_(delta.pool_indices, delta.blocks)] += delta.values.astype(np.float64)
    return out
