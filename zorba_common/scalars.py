"""The one check of a reported scalar (a projected gradient g): finite, and |g| at most the
run's `max_abs_scalar` (RunInfo.max_abs_scalar, the server's aggregation.max_abs_scalar).

The client runs it on each scalar before its local step (a refused one leaves the model
unstepped and the round unreported), the server on each reported step before booking it
(a refused report never reaches alpha): one bad scalar would corrupt the coefficient table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from zorba_common.errors import InvalidScalarError


def check_scalar(g: float, max_abs_scalar: float, what: str) -> float:
    """`g`, or InvalidScalarError naming `what` when it is NaN, infinite or past the limit."""
    if not math.isfinite(g):
        raise InvalidScalarError(
            f"{what} is {g}: the loss diverged or overflowed; lower lr or mu, or check the data")
    if abs(g) > max_abs_scalar:
        raise InvalidScalarError(
            f"{what} = {g:.6g} exceeds the run's limit (max_abs_scalar {max_abs_scalar:.6g}); "
            "the loss difference is implausible (lower lr or mu, or check the data)")
    return g


def check_scalars(steps: Sequence[tuple[int, float]], max_abs_scalar: float) -> None:
    """Every (k, g) of a report checked, the first bad one named by its step and pool index."""
    # One comparison per scalar when all are good (the server checks every report): a NaN
    # or an infinity fails it as well (the limit is finite), and the loop below names it.
    if math.isfinite(max_abs_scalar) and all(
            -max_abs_scalar <= g <= max_abs_scalar for _, g in steps):
        return
    for t, (k, g) in enumerate(steps):
        check_scalar(g, max_abs_scalar, f"step {t}: projected gradient at k={k}")
