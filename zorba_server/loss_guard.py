"""The loss guard's check-batch rule: has an applied update made the model worse? (pure)

Every client measures, before its local steps, the loss of the model it received on its check
batch: the same examples every round (`LocalTask.check_batch`). Between two versions that loss
changes only because the model did, so, unlike training losses (a new batch each step), it can
be compared across rounds without batch noise. The guard keeps an *anchor*: the last version
whose check losses did not rise, with its table. A round in which a majority of the clients
(by count and by sample weight) see their own check loss stand more than the tolerance above
their anchor's shows that the updates since the anchor hurt, one large jump or several small
ones alike; the engine then rolls the table back to the anchor and halves the step, which
recovers after a run of sound rounds (docs/learning.md, "The loss guard"). A client whose
change stands apart from the others' is left out of the verdict, and quarantined (its check
losses ignored) once it has done so QUARANTINE_ROUNDS times: no minority can veto a run.
Clients that send no check loss (older ones) are judged on their training losses instead
(`training_loss_jump`), by the same majority.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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


OUTLIER_MIN_CLIENTS = 3
"""Fewest judged clients among which one can stand out: with two, neither is the odd one."""
OUTLIER_BAND = 1.0
"""The narrowest band (in log units of loss + ln 2) around the others' median change outside
which a client's change is implausible: e times higher or lower than the others' typical
change. An honest client on a one-label shard fell from 0.70 to 0.05 nats (-0.63) without
leaving it; 0.0 -> 1e6 (+14) or back (-14) leaves it by far."""
OUTLIER_MADS = 5.0
"""... or this many (normal-scaled) median absolute deviations of the others' changes, when
they spread more widely than the band."""
QUARANTINE_ROUNDS = 2
"""Rounds in which a client stood out after which the guard ignores its check losses."""


@dataclass(frozen=True)
class Change:
    """One client's check loss at the anchor and now."""

    client_id: str
    weight: float
    before: float
    now: float

    def rose(self, tolerance: float) -> bool:
        return self.now - self.before > tolerance * max(self.before, LOSS_SCALE_FLOOR)

    @property
    def log_ratio(self) -> float:
        """The change in log units, shifted by a coin flip's loss so that 0 nats is finite."""
        return math.log((self.now + LOSS_SCALE_FLOOR) / (self.before + LOSS_SCALE_FLOOR))


@dataclass(frozen=True)
class Verdict:
    regressed: bool
    """A majority of the judged clients, by count and by sample weight, saw their own check
    loss rise more than tolerance x max(their anchor loss, LOSS_SCALE_FLOOR): roll back."""
    improved: bool
    """The weighted median of the judged clients' changes is at or below zero: this version
    becomes the anchor."""
    before: float
    now: float
    """The judged clients' weighted mean check loss at the anchor and now (for the message)."""
    rising: int = 0
    judged: int = 0
    outliers: tuple[str, ...] = ()
    """Clients whose change was implausible next to the others' (left out of this verdict)."""


def outliers(changes: Sequence[Change]) -> tuple[str, ...]:
    """The clients whose change stands outside a robust band of the others' changes (none
    among fewer than OUTLIER_MIN_CLIENTS). Each is measured against the others alone, so one
    extreme value cannot widen the band that would catch it."""
    if len(changes) < OUTLIER_MIN_CLIENTS:
        return ()
    found = []
    for i, c in enumerate(changes):
        others = np.array([o.log_ratio for j, o in enumerate(changes) if j != i])
        centre = float(np.median(others))
        spread = 1.4826 * float(np.median(np.abs(others - centre)))
        if abs(c.log_ratio - centre) > max(OUTLIER_BAND, OUTLIER_MADS * spread):
            found.append(c.client_id)
    return tuple(found)


def majority(flags: Sequence[tuple[float, bool]]) -> bool:
    """More than half of the (weight, flag) pairs are flagged, by count and by weight."""
    total = sum(w for w, _ in flags)
    hit = [w for w, f in flags if f]
    return 2 * len(hit) > len(flags) and 2 * sum(hit) > total


def weighted_median(values: Sequence[tuple[float, float]]) -> float:
    """The lower weighted median of (weight, value) pairs with positive total weight."""
    ordered = sorted(values, key=lambda wv: wv[1])
    half, seen = sum(w for w, _ in ordered) / 2, 0.0
    for w, v in ordered:
        seen += w
        if seen >= half:
            return v
    return ordered[-1][1]


def judge(anchor: Anchor, checks: Mapping[str, float], weights: Mapping[str, float],
          tolerance: float) -> Verdict | None:
    """Compare this round's check losses with the anchor's, client by client, over the clients
    in both (the engine leaves quarantined clients out of `checks`); None when none has weight.

    Judged by the clients, not by one weighted mean: one client's extreme value (0.0, then
    1e6, both on the wire's bounds) stopped every round of a run of four when a mean judged
    (issue 27). A client whose change stands apart from the others' is left out of this
    verdict and named, so the engine can quarantine one that does so again."""
    changes = [Change(cid, weights.get(cid, 0.0), anchor.losses[cid], loss)
               for cid, loss in sorted(checks.items())
               if cid in anchor.losses and weights.get(cid, 0.0) > 0]
    odd = outliers(changes)
    judged = [c for c in changes if c.client_id not in odd]
    total = sum(c.weight for c in judged)
    if total <= 0:
        return None
    rising = [(c.weight, c.rose(tolerance)) for c in judged]
    return Verdict(
        regressed=majority(rising),
        improved=weighted_median([(c.weight, c.now - c.before) for c in judged]) <= 0,
        before=sum(c.weight * c.before for c in judged) / total,
        now=sum(c.weight * c.now for c in judged) / total,
        rising=sum(1 for _, r in rising if r), judged=len(judged), outliers=odd)


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

    Two signs, from what clients report anyway, each judged client by client and needing a
    majority (by count and by weight, as the check losses do): the clients that also reported
    in the last applied or rejected round (`reference`: client -> its mean loss then) saw their
    mean loss rise by more than the tolerance above their own then (the last update hurt; each
    client against itself, because under non-IID data another client has another loss), or
    the clients' last-step losses rose twice that much above their own round means (the local
    steps diverge; a single batch is noisy, hence twice). One honest client on a skewed shard
    reaches a last step of 3 nats over a round mean of 1: with a weighted mean it alone
    rejected rounds (issue 27).
    """
    reports = [(weights[cid], r.report) for cid, r in sorted(received.items()) if weights[cid] > 0]
    if tolerance <= 0 or not reports:
        return None
    common = [(weights[cid], r.report.loss_mean, reference[cid])
              for cid, r in sorted(received.items()) if cid in reference and weights[cid] > 0]
    jumped = [(w, then > 0 and now > then * (1 + tolerance)) for w, now, then in common]
    if common and majority(jumped):
        return (f"the clients' loss jumped from {mean_of((w, t) for w, _, t in common):.4g} to "
                f"{mean_of((w, n) for w, n, _ in common):.4g}: {count(jumped)} of {len(common)} "
                "clients past the tolerance")
    # Single batches are noisy: the within-round sign needs twice the tolerance.
    diverged = [(w, rep.loss_mean > 0 and rep.loss_last > rep.loss_mean * (1 + 2 * tolerance))
                for w, rep in reports]
    if majority(diverged):
        return (f"the clients' loss rose from {mean_of((w, r.loss_mean) for w, r in reports):.4g} "
                f"(round mean) to {mean_of((w, r.loss_last) for w, r in reports):.4g} (last step): "
                f"{count(diverged)} of {len(reports)} clients past twice the tolerance")
    return None


def mean_of(pairs: Iterable[tuple[float, float]]) -> float:
    """The weighted mean of (weight, value) pairs."""
    listed = list(pairs)
    return sum(w * v for w, v in listed) / sum(w for w, _ in listed)


def count(flags: Sequence[tuple[float, bool]]) -> int:
    return sum(1 for _, f in flags if f)


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
