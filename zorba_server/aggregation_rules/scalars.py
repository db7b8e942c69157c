"""What an aggregation rule sees of one round: the clients' per-step sums and who holds what."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # config.py reads the registry's names: no import cycle at run time
    from zorba_server.config import AggregationConfig


@dataclass(frozen=True)
class RoundScalars:
    """One round's reports as arrays, clients in client-id order (n clients, the round's K
    distinct pool indices, its B distinct blocks)."""

    sums: np.ndarray
    """float64 n x K: s[n, k], a client's scaled and clipped projected gradients of step k."""
    weights: np.ndarray
    """float64 n: the clients' sample weights."""
    took: np.ndarray
    """bool n x K: the client took a step on pool index k."""
    holds: np.ndarray
    """bool n x B: the client trained block b."""


Rule = Callable[[RoundScalars, "AggregationConfig"], np.ndarray]
"""rule(scalars, config) -> float64 K x B: the per-(k, b) value that lr multiplies."""


def per_voter_set(scalars: RoundScalars, value: Callable[[np.ndarray], float]) -> np.ndarray:
    """`value` of the sorted s[n, k] of the clients that hold b *and took step k* (a client that
    did not take the step has no opinion on it), unweighted: a weighted vote would let a
    client buy influence with its sample count, which a robust rule is meant to resist."""
    sums, took, holds = scalars.sums, scalars.took, scalars.holds
    out = np.zeros((sums.shape[1], holds.shape[1]))
    for j in range(holds.shape[1]):
        for i in range(sums.shape[1]):
            voters = holds[:, j] & took[:, i]
            if voters.any():
                out[i, j] = value(np.sort(sums[voters, i]))
    return out
