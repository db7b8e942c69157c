"""`sum`: every holder's update counted whole (docs/learning.md, "Averaging throws away steps")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from zorba_server.aggregation_rules.mean import mean
from zorba_server.aggregation_rules.scalars import RoundScalars

if TYPE_CHECKING:
    from zorba_server.config import AggregationConfig


def weighted_sum(scalars: RoundScalars, config: AggregationConfig) -> np.ndarray:
    """The weighted mean over the clients that hold b, times their number: the clients' local
    updates added up, as if taken one after another (weights only shift shares between them).

    Zeroth-order updates are mostly noise along independent random directions, so adding H of
    them moves the model H times as far for H times the variance, which is what H sequential
    steps of one client do; the mean divides the progress by H."""
    holders = scalars.holds.sum(axis=0).astype(np.float64)
    return mean(scalars, config) * holders[None, :]
