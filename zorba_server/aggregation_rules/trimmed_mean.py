"""`trimmed_mean`: a robust rule, cutting `aggregation.trim_fraction` from each end."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from zorba_server.aggregation_rules.scalars import RoundScalars, per_voter_set

if TYPE_CHECKING:
    from zorba_server.config import AggregationConfig


def trimmed_mean(scalars: RoundScalars, config: AggregationConfig) -> np.ndarray:
    """The unweighted mean of s[n, k] over the clients that hold b and took step k, less
    floor(trim_fraction x n) values at each end."""

    def value(sorted_values: np.ndarray) -> float:
        cut = int(math.floor(config.trim_fraction * sorted_values.size))
        return float(sorted_values[cut: sorted_values.size - cut].mean())

    return per_voter_set(scalars, value)
