"""`median`: a robust rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from zorba_server.aggregation_rules.scalars import RoundScalars, per_voter_set

if TYPE_CHECKING:
    from zorba_server.config import AggregationConfig


def median(scalars: RoundScalars, config: AggregationConfig) -> np.ndarray:
    """The unweighted median of s[n, k] over the clients that hold b and took step k."""
    return per_voter_set(scalars, lambda values: float(np.median(values)))
