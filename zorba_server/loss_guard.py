"""The loss guard's check-batch rule: has an applied update made the model worse? (pure)

Every client measures, before its local steps, the loss of the model it received on its check
batch: the same examples every round (`LocalTask.check_batch`). Between two versions that loss
changes only because the model did, so, unlike training losses (a new batch each step), it can
be compared across rounds without batch noise. The guard keeps an *anchor*: the last version
whose check losses did not rise, with its table. A round whose clients' check losses stand
more than the tolerance above the anchor's (the same clients, weighted as aggregation weighs
them) shows that the updates since the anchor hurt, one large jump or several small ones
alike; the engine then rolls the table back to the anchor and halves the step
(docs/learning.md, "The loss guard"). Clients that send no check loss (older ones) are judged
on their training losses instead (`training_loss_jump`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from zorba_server.aggregation import RoundDelta
from zorba_server.rounds import ReceivedReport

LOSS_SCALE_FLOOR = math.log(2)
"""The smallest loss a rise is measured against: a coin flip between two labels. Below it a
relative rise is a small absolute one: one eight-example check batch at 0.30 nats went to 0.45
(+50%) in a 20-minute quickstart, and such rises rolled back sound rounds (docs/learning.md)."""


@dataclass(frozen=True)
class Anchor:
    """The version the guard compares against, with the table to roll back to."""

    version: int
    alpha: np.ndarray
    losses: Mapping[str, float]
    """Client -> check loss at `version` (a client absent from the anchoring round keeps the
    value it measured at an earlier anchor: an approximation, kept rather than dropping it)."""


@dataclass(frozen=True)
class Verdict:
    regressed: bool
    """The check losses stand more than tolerance x max(anchor's, LOSS_SCALE_FLOOR) above the
    anchor's: roll back."""
    improved: bool
    """The check losses are at or below the anchor's: this version becomes the anchor."""
    before: float
    now: float


def judge(anchor: Anchor, checks: Mapping[str, float], weights: Mapping[str, float],
          tolerance: float) -> Verdict | None:
    """Compare this round's check losses with the anchor's, over the clients in both (None
    when no client is in both, or none has weight)."""
    common = [(weights.get(cid, 0.0), loss, anchor.losses[cid])
              for cid, loss in sorted(checks.items()) if cid in anchor.losses]
    total = sum(w for w, _, _ in common)
    if total <= 0:
        return None
    now = sum(w * loss for w, loss, _ in common) / total
    before = sum(w * loss for w, _, loss in common) / total
    return Verdict(regressed=now - before > tolerance * max(before, LOSS_SCALE_FLOOR),
                   improved=now <= before, before=before, now=now)


def advance(anchor: Anchor | None, version: int, alpha: np.ndarray,
            checks: Mapping[str, float]) -> Anchor:
    """The anchor after a round whose checks (measured at `version`) did not rise."""
    losses = dict(anchor.losses) if anchor is not None else {}
    losses.update(checks)
    return Anchor(version, alpha.copy(), losses)


def rollback_delta(alpha: np.ndarray, target: np.ndarray) -> RoundDelta | None:
    """The increments that take `alpha` to `target` (float32, as every delta travels), over
    the rows and columns where they differ; None when they are equal."""
    diff = target - alpha
    rows = np.flatnonzero(np.any(diff != 0, axis=1))
    cols = np.flatnonzero(np.any(diff != 0, axis=0))
    if rows.size == 0:
        return None
    values = diff[np.ix_(rows, cols)].astype(np.float32)
    return RoundDelta(tuple(int(k) for k in rows), tuple(int(b) for b in cols), values)


def training_loss_jump(received: Mapping[str, ReceivedReport], weights: Mapping[str, float],
                       reference: Mapping[str, float], tolerance: float) -> str | None:
    """Why this round's training losses say the step is too large, or None.

    Two signs, from what clients report anyway: the mean loss of the clients that also
    reported in the last applied or rejected round (`reference`: client -> its mean loss then)
    rose by more than the tolerance above their mean then (the last update hurt; the same
    clients, because under non-IID data another mix of clients has another loss), or the
    clients' last-step losses rose twice that much above their round means (the local steps
    diverge; a single batch is noisy, hence twice).
    """
    reports = [(weights[cid], r.report) for cid, r in sorted(received.items()) if weights[cid] > 0]
    total = sum(w for w, _ in reports)
    if tolerance <= 0 or total <= 0:
        return None
    mean = sum(w * rep.loss_mean for w, rep in reports) / total
    last = sum(w * rep.loss_last for w, rep in reports) / total
    common = [(weights[cid], r.report.loss_mean, reference[cid])
              for cid, r in sorted(received.items()) if cid in reference and weights[cid] > 0]
    if common:
        weight = sum(w for w, _, _ in common)
        now = sum(w * loss for w, loss, _ in common) / weight
        then = sum(w * loss for w, _, loss in common) / weight
        if then > 0 and now > then * (1 + tolerance):
            return f"the clients' loss jumped from {then:.4g} to {now:.4g}"
    # Single batches are noisy: the within-round sign needs twice the tolerance.
    if mean > 0 and last > mean * (1 + 2 * tolerance):
        return f"the clients' loss rose from {mean:.4g} (round mean) to {last:.4g} (last step)"
    return None


@dataclass(frozen=True)
class Plateau:
    """How many applied rounds in a row the check losses have not improved on the anchor's,
    and how many times a plateau has cut the step."""

    stale_rounds: int = 0
    step_decays: int = 0

    def after(self, progressed: bool | None, patience: int) -> Plateau:
        """The count after an applied round: `progressed` True (its check losses were at or
        below the anchor's: the anchor advanced), False (they were not) or None (not judged:
        no client in both rounds).

        A step that suits the start of a run is too large once the gradient is small next to
        the minibatch noise: the held-out loss of a 20-minute quickstart turned up after
        version 33 at a constant step (docs/learning.md, "A step that decays on a plateau").
        `patience` rounds in a row without progress cut the step and start the count again
        (0: never)."""
        if progressed is None:
            return self
        if progressed or patience <= 0:
            return Plateau(0, self.step_decays)
        stale = self.stale_rounds + 1
        if stale >= patience:
            return Plateau(0, self.step_decays + 1)
        return Plateau(stale, self.step_decays)
