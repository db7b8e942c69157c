"""The loss guard's slow rule: check losses that drift up over several rounds (pure).

The check-batch rule (loss_guard.judge) rolls back a round whose clients' check losses stand
more than `run.loss_jump_tolerance` (0.5) above the anchor's, the last version whose check
losses did not rise. A run can get worse far more slowly than that and never be caught: on
Gemma 3 270M at the defaults the held-out loss rose from 0.763 to 0.883 (+16%) over six
applied rounds, every one within the tolerance, and the exported model generated garbage
(issue 26). The plateau rule only halves the step after `run.plateau_rounds` (6) rounds.

This rule reads what the guard already keeps: the anchor advances whenever a round's check
losses come back to it, so the versions after the anchor's are exactly the rounds in a row
whose check losses stood above it. When that is `run.loss_drift_rounds` rounds or more and
the check losses now stand more than `run.loss_drift_tolerance` x max(anchor's, ln 2) above
the anchor's, the rise is a trend, not one noisy round: the round is not applied, the table
is rolled back to the anchor and the step is halved, as for a jump.
"""

from __future__ import annotations

from zorba_server.loss_guard import LOSS_SCALE_FLOOR, Verdict


def drifted(verdict: Verdict, anchor_version: int, version: int, rounds: int,
            tolerance: float) -> bool:
    """The check losses measured at `version` have stood above the anchor's (at
    `anchor_version`) for `rounds` versions or more, and now by more than the tolerance."""
    if rounds <= 0 or tolerance <= 0:
        return False
    return (version - anchor_version >= rounds
            and verdict.now - verdict.before > tolerance * max(verdict.before, LOSS_SCALE_FLOOR))


def message(verdict: Verdict, anchor_version: int, version: int) -> str:
    """Why the round is rolled back, for the round's record and the status page."""
    return (f"the clients' check loss has drifted up over {version - anchor_version} rounds, from "
            f"{verdict.before:.4g} (version {anchor_version}) to {verdict.now:.4g} (version "
            f"{version}; run.loss_drift_rounds / run.loss_drift_tolerance)")
