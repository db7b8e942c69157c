"""Closing a round: the decision (aggregation, the fluency watch, the loss guard, plateaus,
the drift bound) and its application.

`RoundClosing.decide_close` returns a `RoundClosure`, everything closing the open round
changes, before any of it is applied (a durable shell commits it first); `apply_close` then
moves the engine. The guard's verdicts are zorba_server/loss_guard.py's and loss_drift.py's,
the fluency watch's fluency_watch.py's, the drift bound drift.py's, the step cuts
step_size.py's; this module composes them. Pure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from zorba_common.messages import AlphaDelta
from zorba_server import calibration, drift_budget, final_check, fluency_watch, loss_drift
from zorba_server import drift as drift_bound
from zorba_server.aggregation import RoundDelta, apply_delta, with_half_column
from zorba_server.engine_state import RoundRecord
from zorba_server.fluency_watch import FluencyVerdict, Fluent, Reference
from zorba_server.loss_guard import (
    QUARANTINE_ROUNDS,
    Anchor,
    Plateau,
    Verdict,
    advance,
    judge,
    rollback_delta,
    training_loss_jump,
)
from zorba_server.members import Membership
from zorba_server.rounds import (
    APPLIED,
    CHECKED,
    REJECTED,
    ReceivedReport,
    RoundOutcome,
    RoundPlan,
    decide_round,
)
from zorba_server.safety_state import SafetyState


@dataclass(frozen=True)
class RoundClosure:
    """Everything closing a round changes, decided before any of it is applied."""

    plan: RoundPlan
    outcome: RoundOutcome
    delta: AlphaDelta | None
    """The published increments (None unless the round applied)."""
    alpha: np.ndarray | None
    """The table after the increments (None unless the round applied)."""
    calibrations: dict[str, float]
    closed_at: float
    client_ids: tuple[str, ...]
    """Clients whose reports were aggregated, in id order."""
    client_losses: dict[str, float] = field(default_factory=dict)
    """Each reporting client's mean loss this round."""
    anchor: Anchor | None = None
    """The loss guard's anchor after this round (None: unchanged)."""
    plateau: Plateau = field(default_factory=Plateau)
    """The plateau count after this round."""
    step_cut: bool = False
    """This round's plateau cut the step for the next rounds."""
    guard_outliers: tuple[str, ...] = ()
    """Clients whose check losses the loss guard found implausible this round."""
    generic_references: dict[str, Reference] = field(default_factory=dict)
    """The fluency watch's references after this round."""
    fluency: FluencyVerdict | None = None
    """The fluency watch's verdict on the round's base version (None: not judged)."""
    fluent: Fluent | None = None
    """The last version the watch found fluent after this round (None: unchanged)."""

    @property
    def backs_off(self) -> bool:
        """The server backs off after this round: not applied by the loss guard (rolled back,
        step halved), or a plateau cut the step. Worth an operator's attention."""
        return self.outcome.status == REJECTED or self.step_cut


@dataclass(frozen=True)
class GuardResult:
    """What the loss guard makes of an applicable round."""

    anchor: Anchor | None = None
    """The new anchor (None: unchanged)."""
    rollback: RoundDelta | None = None
    """The increments that take the table back to the anchor (None: nothing to undo)."""
    rejection: str | None = None
    """Why the round is not applied (None: it is)."""
    progressed: bool | None = None
    """The check losses came back to the anchor's (None: not judged)."""
    outliers: tuple[str, ...] = ()
    """Clients left out of the verdict: their change stood apart from the others'."""
    verdict: Verdict | None = None
    """The check losses' verdict (None: not judged)."""


class RoundClosing(Membership):
    """The round engine's close of a round: when it is due, what it changes, applying it."""

    def closes_at(self, plan: RoundPlan) -> float:
        """When a round closes at the latest: its deadline plus run.report_grace_s, so that a
        report already on its way at the deadline (a client that planned its steps to end by
        then, and the upload and the store after them) still counts (issue 26, item 6)."""
        return plan.deadline + self.config.run.report_grace_s

    def due(self, now: float, *, committing: bool = False) -> bool:
        """The open round should close: every assigned client reported (or left), or its
        closing time passed (`closes_at`). `committing`: reports are still being committed (a
        durable shell's); the round waits for them until then (a close then waits for the
        commits to land)."""
        r = self.open
        if r is None:
            return False
        if now >= self.closes_at(r.plan):
            return True
        # A client that left or was dropped will not report: no waiting.
        members = self.members
        waiting = r.waiting_for(lambda cid: cid in members and not members[cid].left)
        return waiting is None and not committing

    def time_left(self, now: float) -> float | None:
        """Seconds until the open round closes at the latest (0 once it passed; `closes_at`);
        None: no round is open."""
        r = self.open
        return None if r is None else max(0.0, self.closes_at(r.plan) - now)

    def decide_close(self, now: float) -> RoundClosure:
        """What closing the open round changes; nothing is applied yet."""
        r = self.open
        assert r is not None and self.alpha is not None
        plan = r.plan
        weights = {cid: self._sample_weight(cid) for cid in plan.clients}
        outcome = decide_round(plan, r.received, weights, min_reports=self.config.run.min_reports,
                               aggregation=self.config.aggregation,
                               readout_block=self.readout_block())
        checks = {cid: rec.report.loss_check for cid, rec in sorted(r.received.items())
                  if rec.report.loss_check is not None and weights[cid] > 0}
        anchor, change, plateau, step_cut = None, None, self._plateau, False
        outliers: tuple[str, ...] = ()
        references, fluency, fluent = self._watch_fluency(plan, weights)
        if outcome.status == APPLIED and fluency is not None and fluency.broken:
            # The model the clients received no longer generates: back to the last fluent
            # version, whatever the loss guard would say, and the step halved like its rollbacks.
            target = self.fluent or Fluent(0, np.zeros_like(self.alpha))
            change = rollback_delta(self.alpha, target.alpha)
            why = fluency_watch.message(fluency, self.config.run.fluency_tolerance, target.version)
            outcome = dataclasses.replace(outcome, status=REJECTED, delta=None, message=(
                final_check.rejected(self.version, why, target.version) if plan.final_check else
                f"{why}; the step is halved to {self.step_size.after_backoff(*self._cuts())} "
                "for the next rounds (lower run.lr, or set run.max_drift)"))
            plateau = Plateau(0, plateau.step_decays)
            if self._anchor is not None and self._anchor.version > target.version:
                anchor = self._anchor  # moved onto the rolled-back table below
        elif outcome.status == APPLIED:
            guard = self._guard(checks, weights, r.received, training=not plan.final_check)
            anchor, change, outliers = guard.anchor, guard.rollback, guard.outliers
            if guard.rejection is not None:
                if guard.rollback is not None:  # the guard rejected the version itself:
                    fluent = None  # no version for the watch to roll back to
                target_version = self._anchor.version if self._anchor is not None else self.version
                outcome = dataclasses.replace(outcome, status=REJECTED, delta=None, message=(
                    final_check.rejected(self.version, guard.rejection, target_version)
                    if plan.final_check else
                    f"{guard.rejection}; the step is halved to "
                    f"{self.step_size.after_backoff(*self._cuts())} for the next rounds"))
                plateau = Plateau(0, plateau.step_decays)
            elif plan.final_check:
                # Sound: the run ends on this version; the round's own steps measured nothing
                # anyone needs.
                outcome = dataclasses.replace(outcome, status=CHECKED, delta=None, message=(
                    final_check.passed(self.version, guard.verdict, fluency)))
            else:
                change = outcome.delta
                if change is not None and self.base_rms is not None and self.config.run.max_drift > 0:
                    change, scaled = drift_bound.bounded(self.alpha, change, self.base_rms,
                                                         self.config.run.max_drift)
                    if scaled:
                        note = drift_bound.describe(scaled, self.config.run.max_drift)
                        outcome = dataclasses.replace(outcome, delta=change, message=(
                            f"{outcome.message}; {note}" if outcome.message else note))
                move = self.max_move()
                if change is not None and move > 0:
                    # A block's RMS move per parameter is its column's norm: drift.py's drift
                    # with every base RMS at 1; the round's limit per block is its share of
                    # the budget (drift_budget.py), passed as the bound's per-block scale.
                    assert self.footprint is not None
                    moved = drift_bound.block_drift(self.body_alpha(), (1.0,) * self.footprint.num_blocks)
                    rounds_left = (max(1, self.config.run.max_rounds - self.rounds_applied)
                                   if self.config.run.max_rounds > 0 else 0)
                    limits = drift_budget.round_bounds([float(m) for m in moved], move, rounds_left)
                    change, scaled = drift_bound.bounded(self.alpha, change, limits, 1.0)
                    if scaled:
                        note = drift_budget.describe(scaled, move, rounds_left)
                        outcome = dataclasses.replace(outcome, delta=change, message=(
                            f"{outcome.message}; {note}" if outcome.message else note))
                plateau = plateau.after(guard.progressed, self.config.run.plateau_rounds)
                step_cut = plateau.step_decays > self._plateau.step_decays
                if step_cut:
                    outcome = dataclasses.replace(outcome, message=self._plateau_message(outcome))
            if outliers:
                outcome = dataclasses.replace(outcome, message=join_messages(
                    outcome.message, self._outlier_message(outliers, checks)))
        elif plan.final_check:
            outcome = dataclasses.replace(outcome, message=final_check.not_judged(
                outcome.message, self.version))
        delta, alpha = None, None
        if change is not None and outcome.status == APPLIED:
            # Last, after every bound: the readout's column as the published delta carries it.
            change = with_half_column(change, self.readout_block())
            outcome = dataclasses.replace(outcome, delta=change)
        if change is not None:
            delta = AlphaDelta.from_matrix(self.version + 1, plan.round, change.pool_indices,
                                           change.blocks, change.values, self.readout_block())
            alpha = apply_delta(self.alpha, change)
            if anchor is not None and outcome.status == REJECTED:  # rolled back to it
                anchor = Anchor(delta.version, alpha, anchor.losses)
        calibrations = (calibration.decayed(self.members, plan)
                        | calibration.measured(self.config.run, self.members, plan, r.received))
        return RoundClosure(plan, outcome, delta, alpha, calibrations, now, tuple(sorted(r.received)),
                            {cid: rec.report.loss_mean for cid, rec in sorted(r.received.items())},
                            anchor, plateau, step_cut, outliers, references, fluency, fluent)

    def safety_after(self, closure: RoundClosure) -> SafetyState:
        """What the safety rules remember once `closure` is applied: what a durable shell
        stores with the close (safety_state.py), and what `apply_close` takes on."""
        losses = dict(self._reference_losses)
        if closure.outcome.status in (APPLIED, REJECTED):
            # A rejected round moved nothing, so its losses are those of the model as it is:
            # the next round (at half the step) is judged against them. Judged against the
            # last applied round instead, a run whose loss an applied round had already raised
            # was rejected for good (SmolLM2 at lr 1e-3 on the simulator: rounds 2-4).
            losses.update(closure.client_losses)
        return SafetyState(closure.anchor or self._anchor, closure.fluent or self.fluent,
                           dict(closure.generic_references), closure.plateau, losses,
                           closure.fluency or self.last_fluency)

    def _watch_fluency(self, plan: RoundPlan, weights: dict[str, float]) -> tuple[
            dict[str, Reference], FluencyVerdict | None, Fluent | None]:
        """The fluency watch on the open round's generic-text losses: the references after
        it, its verdict on the round's base version (None: nobody judged), and the new last
        fluent version (None: unchanged)."""
        assert self.open is not None and self.alpha is not None
        losses = {cid: rec.report.loss_generic for cid, rec in sorted(self.open.received.items())
                  if rec.report.loss_generic is not None}
        references = fluency_watch.remember(self.generic_references, plan.base_version, losses)
        if plan.base_version != self.version:  # measured a model no longer held: not judged
            return references, None, None
        verdict = fluency_watch.judge(references, plan.base_version, losses, weights,
                                      self.config.run.fluency_tolerance)
        fluent = None if verdict is None or verdict.broken else Fluent(self.version, self.alpha.copy())
        return references, verdict, fluent

    def _plateau_message(self, outcome: RoundOutcome) -> str:
        run = self.config.run
        assert self._anchor is not None
        cut = (f"the clients' check losses have not improved on version {self._anchor.version}'s "
               f"for {run.plateau_rounds} rounds: the step is cut to "
               f"{self.step_size.after_plateau(*self._cuts())} for the next rounds")
        return f"{outcome.message}; {cut}" if outcome.message else cut

    def guard_quarantined(self) -> set[str]:
        """Members whose check losses the loss guard ignores: implausible too often."""
        return {cid for cid, m in self.members.items()
                if m.guard_outlier_rounds >= QUARANTINE_ROUNDS}

    def _outlier_message(self, outliers: tuple[str, ...], checks: dict[str, float]) -> str:
        assert self._anchor is not None
        named = ", ".join(f"{cid} ({self._anchor.losses[cid]:.4g} -> {checks[cid]:.4g})"
                          for cid in outliers)
        return (f"check losses implausible next to the other clients' changes, left out of the "
                f"loss guard: {named}; a client that stands out in {QUARANTINE_ROUNDS} rounds is "
                "ignored by the guard for the rest of the run")

    def _guard(self, checks: dict[str, float], weights: dict[str, float],
               received: dict[str, ReceivedReport], *, training: bool = True) -> GuardResult:
        """The loss guard on an applicable round (`training` False: the round's own steps are
        not judged, only the model its clients received: a final check's)."""
        assert self.alpha is not None
        run = self.config.run
        tolerance = run.loss_jump_tolerance
        if tolerance <= 0 and run.plateau_rounds <= 0 and run.loss_drift_rounds <= 0:
            return GuardResult()
        quarantined = self.guard_quarantined()
        checks = {cid: loss for cid, loss in checks.items() if cid not in quarantined}
        verdict = judge(self._anchor, checks, weights, tolerance) if self._anchor else None
        outliers = verdict.outliers if verdict is not None else ()
        drift = verdict is not None and self._anchor is not None and loss_drift.drifted(
            verdict, self._anchor.version, self.version, run.loss_drift_rounds,
            run.loss_drift_tolerance)
        if verdict is not None and (drift or (tolerance > 0 and verdict.regressed)):
            anchor = self._anchor
            assert anchor is not None
            jumped = tolerance > 0 and verdict.regressed
            why = (loss_drift.message(verdict, anchor.version, self.version) if not jumped else
                   f"the clients' check loss rose from {verdict.before:.4g} (version "
                   f"{anchor.version}) to {verdict.now:.4g} (version {self.version})")
            return GuardResult(anchor, rollback_delta(self.alpha, anchor.alpha), (
                f"{why}; {verdict.rising} of {verdict.judged} clients past the tolerance: this "
                f"round is not applied and the table is rolled back to version {anchor.version} "
                "(rounds rejected again and again mean run.lr is "
                "far too large for this model: lower it, or use run.estimator = 'normalised', "
                "whose step does not grow with the model's gradient scale: docs/learning.md)"),
                outliers=outliers, verdict=verdict)
        anchor = None
        if checks and (self._anchor is None or verdict is None or verdict.improved):
            # An implausible value does not anchor: the next one is measured against the last
            # plausible one, so a client that keeps standing out is quarantined.
            anchor = advance(self._anchor, self.version, self.alpha,
                             {cid: loss for cid, loss in checks.items() if cid not in outliers})
        # Without check losses (older clients) the training losses judge, as before. With them
        # the training losses do not: one client's few batches are noisy (a last step twice the
        # round's mean is common), and a rise they would catch shows in the next round's check
        # losses, which roll it back.
        jump = None if checks or not training else training_loss_jump(
            received, weights, self._reference_losses, tolerance)
        return GuardResult(anchor, None, None if jump is None else f"{jump}: not applied",
                           None if verdict is None else verdict.improved, outliers, verdict)

    def apply_close(self, closure: RoundClosure) -> None:
        plan, outcome = closure.plan, closure.outcome
        if self.open is not None and self.open.plan.round == plan.round and self.energy is not None:
            # Every report's scalars measured the round's base model, whatever the round's fate.
            self.energy.observe_round(plan.round, [
                (plan.clients[cid].blocks, (g for _, g in rec.report.steps))
                for cid, rec in sorted(self.open.received.items())], plan.hyper.directions)
            if self.signal is not None:
                self.signal.observe(plan.round, [
                    (plan.clients[cid].blocks, rec.report.steps)
                    for cid, rec in sorted(self.open.received.items())], plan.hyper.directions)
        if closure.delta is not None and closure.alpha is not None:
            self.alpha, self.version = closure.alpha, closure.delta.version
            self.deltas.append(closure.delta)
        self.restore_safety(self.safety_after(closure))
        for cid in closure.guard_outliers:
            if cid in self.members:
                self.members[cid].guard_outlier_rounds += 1
        for cid, value in closure.calibrations.items():
            if cid in self.members:
                self.members[cid].calibration = value
        self._previous = {cid: frozenset(p.blocks) for cid, p in plan.clients.items()}
        self.last_plan = plan
        self.history.append(RoundRecord(plan.round, outcome.status, len(plan.clients),
                                        outcome.reports, plan.opened_at, closure.closed_at,
                                        outcome.loss, outcome.message, plan.schedule_method,
                                        plan.final_check))
        self.open = None
        end = self.run_end()
        if end is not None:
            self.finished, self.idle_reason = True, end

    def run_end(self) -> str | None:
        """Why the run is over (None: it is not; final_check.py)."""
        return final_check.run_end(self.config.run, self.safety_measured, self.rounds_applied,
                                   self.history)


def join_messages(*parts: str) -> str:
    return "; ".join(p for p in parts if p)

