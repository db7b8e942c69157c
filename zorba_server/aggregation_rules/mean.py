"""`mean`: the default rule (docs/design.md §2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from zorba_server.aggregation_rules.scalars import RoundScalars

if TYPE_CHECKING:
    from zorba_server.config import AggregationConfig


def mean(scalars: RoundScalars, config: AggregationConfig) -> np.ndarray:
    """The sample-weighted mean of s[n, k] over the clients that hold b.

    A client that holds b but took fewer steps contributes 0 for the steps it did not take:
    FedAvg of the clients' local updates."""
    weights, holds = scalars.weights, scalars.holds.astype(np.float64)
    # einsum without BLAS: a fixed summation order, so results do not depend on threads.
    numerator = np.einsum("nk,nb->kb", scalars.sums * weights[:, None], holds, optimize=False)
    denominator = np.einsum("n,nb->b", weights, holds, optimize=False)
    return numerator / denominator[None, :]
