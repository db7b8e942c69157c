"""The drift budget: the largest move of any block the model tolerates, measured (pure).

Each client measures its model's fluency curvature kappa at start-up (zorba_edge/engine/
drift_tolerance.py, `DeviceProfile.fluency_curvature`): the generic-text loss rises by a
fraction ~kappa s^2 when every block has moved an RMS of s per parameter along random
directions, which is what a zeroth-order run's moves nearly all are. The run turns it into

    s* = sqrt(run.drift_budget x run.fluency_tolerance / kappa),

the move per parameter at which the loss is predicted to stand `drift_budget` of the fluency
watch's tolerance above the base model's, and no block of base + alpha may move further (in a
run of set length, run.max_rounds, each round may take only its share of what is left:
`round_bounds`): a
block's move per parameter is the norm of its column of alpha, sqrt(sum_k alpha[k,b]^2)
(zorba_server/drift.py), so the bound is drift.bounded with every base RMS at 1. Measured
(docs/learning.md, "The drift budget"): Gemma 3 270M kappa ~1.7e4, s* ~2.4e-3 (its first
applied round of the party task moved every block 2.3e-3 and raised the loss 11%; its second
moved 4e-3 and 108%); SmolLM2-135M kappa ~660, s* ~1.2e-2.

Honest clients of one run hold the same weights and probe them with the same seed and text,
so their values agree to rounding (a client on another device or dtype within a few percent).
The run uses the median of the values sent (of an even number, the larger middle one: the
tighter bound), so a minority cannot move it far, and marks the clients whose value stands
more than CURVATURE_AGREEMENT from it. A run whose clients sent none (older clients, or none
could hold every block at once to probe it) has no budget: today's behaviour.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from zorba_server.drift_limits import Limited, describe_blocks

DRIFT_BUDGET = 0.5
"""run.drift_budget's default: the predicted rise at the bound is half the watch's tolerance,
so the bound stops a run before the watch would roll it back (a run's own moves raised Gemma's
loss ~1.5x as much as random ones of the same size: docs/learning.md)."""
CURVATURE_AGREEMENT = 2.0
"""A client's value more than this factor from the run's is marked as standing apart."""


@dataclass(frozen=True)
class AgreedCurvature:
    curvature: float | None
    """The run's fluency curvature (None: no client sent one)."""
    ignored: tuple[str, ...] = ()
    """Clients whose value stood apart from it, in the order given."""


def agreed(sent: Sequence[tuple[str, float]]) -> AgreedCurvature:
    """The median of `sent` ((client, kappa)), the larger middle value of an even count, and
    the clients more than CURVATURE_AGREEMENT from it."""
    if not sent:
        return AgreedCurvature(None)
    value = statistics.median_high([kappa for _, kappa in sent])

    def apart(kappa: float) -> bool:
        if value <= 0 or kappa <= 0:
            return (value <= 0) != (kappa <= 0)
        return abs(math.log(kappa / value)) > math.log(CURVATURE_AGREEMENT)

    return AgreedCurvature(value, tuple(cid for cid, kappa in sent if apart(kappa)))


def max_move(curvature: float | None, fluency_tolerance: float, budget: float) -> float:
    """s*: the largest RMS move per parameter of any block (0: no bound, because nothing was
    measured, the budget or the watch is off, or the model's loss does not rise)."""
    if curvature is None or curvature <= 0 or budget <= 0 or fluency_tolerance <= 0:
        return 0.0
    return math.sqrt(budget * fluency_tolerance / curvature)


def round_bounds(moves: Sequence[float], bound: float, rounds_left: int) -> tuple[float, ...]:
    """Per block, the move this round may bring it to, given each block's move now (`moves`):
    with the run's remaining rounds counted (`rounds_left` >= 1, this one included), its
    squared move plus an even share of what is left of the squared budget,
    sqrt(m^2 + (s*^2 - m^2) / rounds_left), so the run reaches the bound at its last round;
    with `rounds_left` 0 (a run of no set length) the bound itself. A block at or past the
    bound stays bounded by it.

    Why spread it: a run's move is nearly all noise, growing as sqrt(steps) x step, while what
    it learns grows as steps x step; within one budget, n times the steps learn sqrt(n) times
    as much. A run that spent the budget in its first round (Gemma 3: 20 steps) would spend
    the rest on the bound, each round displacing older content (drift.py's KEEP_STEP: a block
    at its limit, this round's share or the bound, takes half its step and shrinks older
    coefficients to make room). Scaling a round's increments after the fact gives the same
    learning per move as shorter steps would (both shrink signal and noise alike)."""
    if rounds_left <= 0:
        return tuple(bound for _ in moves)
    return tuple(bound if m >= bound else math.sqrt(m * m + (bound * bound - m * m) / rounds_left)
                 for m in moves)


def describe(limited: dict[int, Limited], bound: float, rounds_left: int = 0) -> str:
    """One line for the round's message and the status page."""
    share = (f"; this round's share of it, {rounds_left} round(s) left" if rounds_left > 1
             else "")
    return (f"the drift budget (a move of at most {bound:.3g} per parameter, measured: "
            f"run.drift_budget{share}) {describe_blocks(limited)}")
