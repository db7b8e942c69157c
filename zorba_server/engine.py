"""The round engine: the server's round policy as plain synchronous code.

No HTTP, no asyncio, no storage and no clock of its own: every call that depends on time
takes `now`, and every change it decides is returned to the caller before it is applied, so
a shell can make it durable first (the aiohttp coordinator commits to its database; the
simulator applies it at once; a Flower server app checkpoints it). Every shell drives the
same decisions:

    check_registration -> add_member          who may join (one admission rule, shared
                                              with the client's own check)
    propose_round -> open_round               plan: schedule, local steps, pool indices
                                              (what a polling client hears: polling.py)
    check_report -> accept_report             a report fits the plan, or a domain error
    due -> decide_close -> apply_close        alpha increments and memory calibrations
    mark_left / mark_seen, drop_member        a member that left, came back, or is gone

Errors are domain errors (`zorba_server.errors`); only the HTTP app maps them to statuses.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zorba_common.memory_model import LinearMemoryModel, ModelFootprint, usable_budget
from zorba_common.messages import AlphaDelta, AlphaState, DeviceProfile, HyperParams, Report, RunInfo
from zorba_server import calibration, errors, loss_drift
from zorba_server import drift as drift_bound
from zorba_server.aggregation import RoundDelta, apply_delta
from zorba_server.block_energy import BlockEnergy
from zorba_server.config import ServerConfig
from zorba_server.loss_guard import (
    QUARANTINE_ROUNDS,
    Anchor,
    Plateau,
    advance,
    judge,
    rollback_delta,
    training_loss_jump,
)
from zorba_server.members import LEFT, Member, check_budget, check_same_model, memory_model
from zorba_server.modes import MODES, SolveFn
from zorba_server.pool_indices import round_pool_indices
from zorba_server.rounds import (
    APPLIED,
    REJECTED,
    ClientPlan,
    ReceivedReport,
    RoundOutcome,
    RoundPlan,
    check_report,
    decide_round,
    slice_pool,
)
from zorba_server.scheduler import ClientSpec, Schedule, local_steps
from zorba_server.step_size import StepSize


@dataclass
class OpenRound:
    plan: RoundPlan
    received: dict[str, ReceivedReport] = field(default_factory=dict)
    """Accepted reports (for the server: committed ones)."""


@dataclass(frozen=True)
class RoundRecord:
    """A closed round as the status page lists it."""

    round: int
    status: str
    assigned: int
    reports: int
    opened_at: float
    closed_at: float | None
    loss: float | None
    message: str
    method: str


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


class RoundEngine:
    """The state of one run and the rules that move it from round to round."""

    def __init__(self, config: ServerConfig, solve: SolveFn | None = None) -> None:
        """`solve`: a test's or benchmark's own solver in place of the run mode's."""
        run = config.run
        self.config = config
        self.mode = MODES[run.mode]
        self._solve = solve or self.mode.solve
        self.seed = run.seed
        self.pool_size = run.pool_size
        self.fingerprint: str | None = None
        self.footprint: ModelFootprint | None = None
        self.alpha: np.ndarray | None = None
        self.version = 0
        self.deltas: deque[AlphaDelta] = deque(maxlen=run.catch_up_rounds)
        self.members: dict[str, Member] = {}
        self.history: list[RoundRecord] = []
        self.open: OpenRound | None = None
        self.round_counter = 1
        """The number the next round to open gets."""
        self.finished = False
        self.idle_reason = "starting"
        self.last_plan: RoundPlan | None = None
        self.last_schedule: Schedule | None = None
        self.schedule_solve_s = 0.0
        self.schedules_solved = 0
        """Scheduler runs by this engine (a restarted server counts from 0)."""
        self.reports_accepted = 0
        """Reports booked over the whole run (a shell that resumes adds the stored ones)."""
        self._schedule_key: tuple[Any, ...] | None = None
        self._reference_losses: dict[str, float] = {}
        """Each client's mean loss in the last applied or rejected round it reported in (the
        loss guard's reference; empty after a restart until a round closes)."""
        self._anchor: Anchor | None = None
        """The last version whose check losses did not rise (zorba_server/loss_guard.py; re-made
        from the first round after a restart)."""
        self._plateau = Plateau()
        """Rounds without progress on the anchor, and the step cuts they made (after a
        restart: the cuts the last stored plan carries, counting afresh)."""
        self._previous: dict[str, frozenset[int]] = {}
        self.step_size = StepSize(run.lr, run.lr_scaling, run.trust_radius)
        """The one owner of the step size (zorba_server/step_size.py)."""
        self.energy: BlockEnergy | None = None
        """Per-block E[g^2] from the reported scalars (zorba_server/block_energy.py; None until
        the model is pinned)."""
        self.base_rms: tuple[float, ...] | None = None
        """RMS of each block's base weights, where a shell that holds the model gives it (the
        simulator): what run.max_drift is relative to (zorba_server/drift.py). None: the bound
        is off, whatever run.max_drift says."""

    # ------------------------------------------------------------------ the model and its table

    def pin(self, fingerprint: str, footprint: ModelFootprint,
            alpha: np.ndarray | None = None) -> np.ndarray:
        """Fix the run's model and its coefficient table (zeros unless given); returns the
        table, for a shell to store."""
        if alpha is None:
            alpha = np.zeros((self.pool_size, footprint.num_blocks))
        self.fingerprint, self.footprint, self.alpha = fingerprint, footprint, alpha
        self.energy = BlockEnergy(footprint.block_params)
        return alpha

    def pin_first(self, profile: DeviceProfile) -> np.ndarray | None:
        """The first registration pins the run's model: the new table when this one did (a
        shell that fails to store it calls `unpin`), None when the model was pinned already."""
        if self.fingerprint is not None:
            return None
        return self.pin(profile.model_fingerprint, profile.footprint)

    def unpin(self) -> None:
        self.fingerprint = self.footprint = self.alpha = None

    @property
    def weights_only(self) -> bool:
        """fedavg: training travels as uploaded weights, reports carry no ZO steps."""
        return self.mode.weights_only

    def hyper(self) -> HyperParams:
        run = self.config.run
        return HyperParams(self.step_size.round_lr(*self._cuts()), run.mu, run.batch_size,
                           run.seq_len, run.estimator, run.directions, self.step_size.trust_radius)

    def _cuts(self) -> tuple[tuple[str, ...], int]:
        """(the closed rounds' statuses, plateau cuts): the loss guard's rejections and
        recoveries are derived from the history, the cuts carried by each round's plan, so a
        restarted server continues with the same step."""
        return tuple(h.status for h in self.history), self._plateau.step_decays

    def lr_factor(self) -> float:
        """What the cuts have left of run.lr (StepSize.factor)."""
        return self.step_size.factor(*self._cuts())

    def lr_scale(self, blocks: Sequence[int]) -> float:
        """A client's step scale (StepSize.client_scale)."""
        if self.config.run.lr_scaling == "none":
            return 1.0
        assert self.footprint is not None
        energy = self.energy.estimate() if self.energy is not None else None
        return self.step_size.client_scale(self.footprint.block_params, blocks,
                                           None if energy is None else energy.tolist())

    def run_info(self, run_id: str) -> RunInfo:
        run = self.config.run
        assert self.footprint is not None and self.fingerprint is not None
        return RunInfo(
            run_id=run_id, seed=self.seed, pool_size=self.pool_size,
            num_blocks=self.footprint.num_blocks, model_fingerprint=self.fingerprint,
            hyper=self.hyper(), round_duration_s=run.round_duration_s,
            poll_timeout_s=run.poll_timeout_s,
            max_abs_scalar=self.config.aggregation.max_abs_scalar, mode=run.mode,
        )

    def alpha_state(self, run_id: str) -> AlphaState:
        """The whole table at the current version (what a client far behind syncs from)."""
        if self.alpha is None or self.footprint is None:
            raise errors.conflict(
                "model_not_pinned", "no client has registered a model yet: the table has no shape")
        return AlphaState(run_id, self.version, self.pool_size, self.footprint.num_blocks,
                          np.ascontiguousarray(self.alpha, dtype="<f8").tobytes())

    def counters(self) -> dict[str, int]:
        """The run's totals: reports booked, closed rounds by outcome (derived from the
        history, so they survive a restart), and this engine's scheduler runs."""
        applied = sum(1 for h in self.history if h.status == APPLIED)
        rejected = sum(1 for h in self.history if h.status == REJECTED)
        return {"reports_accepted": self.reports_accepted, "rounds_applied": applied,
                "rounds_rejected": rejected, "rounds_failed": len(self.history) - applied - rejected,
                "schedules_solved": self.schedules_solved}

    # ------------------------------------------------------------------ membership

    def memory_model(self, profile: DeviceProfile, calibration: float) -> LinearMemoryModel:
        return memory_model(self.config.run, profile, calibration)

    def check_registration(self, profile: DeviceProfile) -> None:
        """Refuse a device that runs another model, or that could never hold a block."""
        if self.fingerprint is not None:
            assert self.footprint is not None
            check_same_model(profile, self.fingerprint, self.footprint)
        if self.mode.enforces_budget:  # fedavg: its peaks over the budget are the finding
            check_budget(self.config.run, profile)

    def add_member(self, member: Member) -> None:
        self.members[member.client_id] = member

    def drop_member(self, client_id: str) -> None:
        """Forget a member; its assignment in an open round stays, unreported."""
        self.members.pop(client_id, None)

    def mark_left(self, member: Member) -> None:
        """The client stopped: not active (the next schedule leaves it out without waiting for
        its membership timeout, and an open round does not wait for its report)."""
        member.last_seen = LEFT

    def mark_seen(self, member: Member, now: float) -> bool:
        """The client made a request: active again. True when it had left (it is back)."""
        returned = member.left
        member.last_seen = now
        return returned

    def active_members(self, now: float) -> list[Member]:
        horizon = now - self.config.run.membership_timeout_s
        return [m for m in self.members.values() if m.last_seen >= horizon]

    # ------------------------------------------------------------------ planning a round

    def propose_round(self, now: float, members: Sequence[Member] | None = None) -> RoundPlan | None:
        """The next round's plan, or None (with `idle_reason` saying why). Changes no round
        state: the shell stores the plan, then calls `open_round`. `members`: the active
        members as of `now` (a shell that plans off its event loop takes them first)."""
        if self.footprint is None:
            self.idle_reason = "waiting for the first client to register (the model is not pinned)"
            return None
        if self.open is not None or self.finished:
            return None
        run = self.config.run
        members = list(self.active_members(now) if members is None else members)
        if len(members) < run.min_clients:
            self.idle_reason = (f"waiting for clients: {len(members)} active, {run.min_clients} "
                                "needed to open a round")
            return None
        schedule = self._schedule(members)
        if schedule is None:
            return None
        if len(schedule.assignments) < run.min_reports:
            # Such a round could only fail: wait for more clients instead.
            self.idle_reason = (
                f"the scheduler admitted {len(schedule.assignments)} clients, fewer than "
                f"min_reports={run.min_reports}: waiting for more clients")
            return None
        clients = {
            m.client_id: ClientPlan(
                schedule.assignments[m.client_id],
                local_steps(m.step_time_s, self.compute_time_s(), min_steps=run.min_steps,
                            max_steps=run.max_steps),
                self.lr_scale(schedule.assignments[m.client_id]))
            for m in members if m.client_id in schedule.assignments
        }
        clients = slice_pool(clients, run.pool_slices)
        length = max(p.first_step + p.num_steps for p in clients.values())
        return RoundPlan(
            round=self.round_counter, base_version=self.version, opened_at=now,
            deadline=now + run.round_duration_s, hyper=self.hyper(),
            pool_indices=round_pool_indices(self.seed, self.round_counter, length, self.pool_size),
            clients=clients, excluded=dict(schedule.excluded_clients),
            uncovered_blocks=tuple(sorted(schedule.uncovered_blocks)),
            schedule_method=schedule.method, step_decays=self._plateau.step_decays,
        )

    def open_round(self, plan: RoundPlan) -> None:
        self.open = OpenRound(plan)
        self.round_counter = plan.round + 1

    def compute_time_s(self) -> float:
        """Seconds of a round a client spends on steps: it also syncs, reports and waits."""
        return self.config.run.round_duration_s * self.config.run.compute_fraction

    def _schedule(self, members: list[Member]) -> Schedule | None:
        """Reuse the last schedule unless membership (or a calibration band) changed, or the
        mode redraws its blocks every round."""
        key: tuple[Any, ...] = tuple(sorted(
            (m.client_id, calibration.band(m.calibration)) for m in members))
        if self.mode.redraws_each_round:
            key += (self.round_counter,)
        if key == self._schedule_key and self.last_schedule is not None:
            return self.last_schedule if self.last_schedule.assignments else None
        assert self.footprint is not None
        run = self.config.run
        specs = [
            ClientSpec(m.client_id, usable_budget(m.profile.memory_budget_bytes, run.memory_headroom),
                       self.memory_model(m.profile, m.calibration), float(m.profile.num_samples),
                       m.step_time_s, self._previous.get(m.client_id, frozenset()))
            for m in members
        ]
        sched_config = dataclasses.replace(
            self.config.scheduler, round_deadline_s=self.compute_time_s(),
            min_steps=run.min_steps, max_steps=run.max_steps)
        schedule = self._solve(specs, self.footprint.block_params, sched_config,
                               round_seed(self.seed, self.round_counter))
        self.schedule_solve_s = schedule.solve_s
        self.schedules_solved += 1
        self._schedule_key, self.last_schedule = key, schedule
        if not schedule.assignments:
            reasons = "; ".join(f"{cid}: {why}"
                                for cid, why in sorted(schedule.excluded_clients.items()))
            self.idle_reason = f"the scheduler admitted no client ({reasons})"
            return None
        return schedule

    # ------------------------------------------------------------------ the published deltas

    def deltas_since(self, version: int) -> tuple[tuple[AlphaDelta, ...], bool]:
        """The published deltas after `version`, or catch_up=True when they are no longer kept."""
        gap = self.version - version
        if gap <= 0:
            return (), False
        if gap > len(self.deltas):
            return (), True
        return tuple(self.deltas)[-gap:], False

    # ------------------------------------------------------------------ reports

    def check_report(self, client_id: str, round_: int, report: Report, now: float) -> OpenRound:
        """The open round `report` belongs to, or a domain error (nothing changes)."""
        r = self.open
        if r is None or r.plan.round != round_:
            raise self.refuse_round(round_)
        if client_id in r.received:
            raise errors.conflict("already_reported",
                                  f"client {client_id} already reported for round {round_}")
        if now >= self.closes_at(r.plan):
            raise round_closed(round_)
        check_report(r.plan, client_id, report, max_abs_scalar=self.config.aggregation.max_abs_scalar,
                     weights_only=self.weights_only)
        return r

    def refuse_round(self, round_: int) -> errors.Refusal:
        """Why a report for `round_`, which is not the open round, is refused: the round does
        not exist, or it closed."""
        r = self.open
        current = r.plan.round if r is not None else self.round_counter - 1
        if round_ > current or round_ < 1:
            return errors.not_found(
                "unknown_round", f"round {round_} does not exist (current round: {current})")
        return round_closed(round_)

    def accept_report(self, received: ReceivedReport) -> None:
        """Book a checked report into the open round and the member's record."""
        assert self.open is not None
        self.open.received[received.client_id] = received
        self.reports_accepted += 1
        member = self.members.get(received.client_id)
        if member is None:
            return
        member.rounds_reported += 1
        member.last_loss = received.report.loss_mean
        member.last_peak_bytes = received.report.peak_memory_bytes
        if received.report.step_time_s > 0:
            member.step_time_s = received.report.step_time_s

    # ------------------------------------------------------------------ closing a round

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
        waiting = [cid for cid in r.plan.clients if cid not in r.received
                   and cid in self.members and not self.members[cid].left]
        return not waiting and not committing

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
                               aggregation=self.config.aggregation)
        checks = {cid: rec.report.loss_check for cid, rec in sorted(r.received.items())
                  if rec.report.loss_check is not None and weights[cid] > 0}
        anchor, change, plateau, step_cut = None, None, self._plateau, False
        outliers: tuple[str, ...] = ()
        if outcome.status == APPLIED:
            guard = self._guard(checks, weights, r.received)
            anchor, change, outliers = guard.anchor, guard.rollback, guard.outliers
            if guard.rejection is not None:
                outcome = dataclasses.replace(outcome, status=REJECTED, delta=None, message=(
                    f"{guard.rejection}; the step is halved to "
                    f"{self.step_size.after_backoff(*self._cuts()):.3g} for the next rounds"))
                plateau = Plateau(0, plateau.step_decays)
            else:
                change = outcome.delta
                if change is not None and self.base_rms is not None and self.config.run.max_drift > 0:
                    change, scaled = drift_bound.bounded(self.alpha, change, self.base_rms,
                                                         self.config.run.max_drift)
                    if scaled:
                        note = drift_bound.describe(scaled, self.config.run.max_drift)
                        outcome = dataclasses.replace(outcome, delta=change, message=(
                            f"{outcome.message}; {note}" if outcome.message else note))
                plateau = plateau.after(guard.progressed, self.config.run.plateau_rounds)
                step_cut = plateau.step_decays > self._plateau.step_decays
                if step_cut:
                    outcome = dataclasses.replace(outcome, message=self._plateau_message(outcome))
            if outliers:
                outcome = dataclasses.replace(outcome, message=join_messages(
                    outcome.message, self._outlier_message(outliers, checks)))
        delta, alpha = None, None
        if change is not None:
            delta = AlphaDelta.from_matrix(self.version + 1, plan.round, change.pool_indices,
                                           change.blocks, change.values)
            alpha = apply_delta(self.alpha, change)
            if anchor is not None and outcome.status == REJECTED:  # rolled back to it
                anchor = Anchor(delta.version, alpha, anchor.losses)
        calibrations = (calibration.decayed(self.members, plan)
                        | calibration.measured(self.config.run, self.members, plan, r.received))
        return RoundClosure(plan, outcome, delta, alpha, calibrations, now, tuple(sorted(r.received)),
                            {cid: rec.report.loss_mean for cid, rec in sorted(r.received.items())},
                            anchor, plateau, step_cut, outliers)

    def _plateau_message(self, outcome: RoundOutcome) -> str:
        run = self.config.run
        assert self._anchor is not None
        cut = (f"the clients' check losses have not improved on version {self._anchor.version}'s "
               f"for {run.plateau_rounds} rounds: the step is cut to "
               f"{self.step_size.after_plateau(*self._cuts()):.3g} for the next rounds")
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
               received: dict[str, ReceivedReport]) -> GuardResult:
        """The loss guard on an applicable round."""
        assert self.alpha is not None
        run = self.config.run
        tolerance = run.loss_jump_tolerance
        if tolerance <= 0 and run.plateau_rounds <= 0 and run.loss_drift_rounds <= 0:
            return GuardResult()
        quarantined = self.guard_quarantined()
        checks = {cid: loss for cid, loss in checks.items() if cid not in quarantined}
        verdict = judge(self._anchor, checks, weights, tolerance) if self._anchor else None
        outliers = verdict.outliers if verdict is not None else ()
        statuses, decays = self._cuts()
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
                f"round is not applied and the table is rolled back to version {anchor.version}; "
                f"the step is halved (x{self.step_size.factor([*statuses, REJECTED], decays):g} "
                "of run.lr from the next round). Rounds rejected again and again mean run.lr is "
                "far too large for this model: lower it, or use run.estimator = 'normalised', "
                "whose step does not grow with the model's gradient scale (docs/learning.md)"),
                outliers=outliers)
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
        jump = None if checks else training_loss_jump(received, weights, self._reference_losses,
                                                      tolerance)
        return GuardResult(anchor, None, None if jump is None else f"{jump}: not applied",
                           None if verdict is None else verdict.improved, outliers)

    def sample_weights(self, client_ids: Iterable[str]) -> dict[str, float]:
        return {cid: self._sample_weight(cid) for cid in client_ids}

    def _sample_weight(self, client_id: str) -> float:
        member = self.members.get(client_id)
        return float(member.profile.num_samples) if member is not None else 0.0

    def apply_close(self, closure: RoundClosure) -> None:
        plan, outcome = closure.plan, closure.outcome
        if self.open is not None and self.open.plan.round == plan.round and self.energy is not None:
            # Every report's scalars measured the round's base model, whatever the round's fate.
            for cid, rec in sorted(self.open.received.items()):
                self.energy.observe(plan.round, plan.clients[cid].blocks,
                                    [g for _, g in rec.report.steps], plan.hyper.directions)
        if closure.delta is not None and closure.alpha is not None:
            self.alpha, self.version = closure.alpha, closure.delta.version
            self.deltas.append(closure.delta)
        if closure.anchor is not None:
            self._anchor = closure.anchor
        for cid in closure.guard_outliers:
            if cid in self.members:
                self.members[cid].guard_outlier_rounds += 1
        self._plateau = closure.plateau
        if closure.outcome.status in (APPLIED, REJECTED):
            # A rejected round moved nothing, so its losses are those of the model as it is:
            # the next round (at half the step) is judged against them. Judged against the
            # last applied round instead, a run whose loss an applied round had already raised
            # was rejected for good (SmolLM2 at lr 1e-3 on the simulator: rounds 2-4).
            self._reference_losses.update(closure.client_losses)
        for cid, value in closure.calibrations.items():
            if cid in self.members:
                self.members[cid].calibration = value
        self._previous = {cid: frozenset(p.blocks) for cid, p in plan.clients.items()}
        self.last_plan = plan
        self.history.append(RoundRecord(plan.round, outcome.status, len(plan.clients),
                                        outcome.reports, plan.opened_at, closure.closed_at,
                                        outcome.loss, outcome.message, plan.schedule_method))
        self.open = None
        max_rounds = self.config.run.max_rounds
        if max_rounds and self.version >= max_rounds:
            self.finished = True
            self.idle_reason = f"the run finished after {self.version} applied rounds"

    # ------------------------------------------------------------------ resuming

    def restore_round(self, plan: RoundPlan, status: str, reports: int, closed_at: float | None,
                      loss: float | None, message: str) -> None:
        """Replay one stored round (in order) when a shell resumes a run."""
        self.round_counter = plan.round + 1
        self._previous = {cid: frozenset(p.blocks) for cid, p in plan.clients.items()}
        self.last_plan = plan
        self._plateau = Plateau(0, plan.step_decays)
        self.history.append(RoundRecord(plan.round, status, len(plan.clients), reports,
                                        plan.opened_at, closed_at, loss, message,
                                        plan.schedule_method))

    def reopen(self, plan: RoundPlan, received: Iterable[ReceivedReport]) -> None:
        """Resume a round that was open when the shell stopped, with its accepted reports."""
        if self.history and self.history[-1].round == plan.round:
            self.history.pop()
        self.open = OpenRound(plan, {r.client_id: r for r in received})
        self.round_counter = plan.round + 1


def join_messages(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def round_seed(run_seed: int, round_: int) -> int:
    """A per-round seed for modes that draw their assignment anew each round."""
    return int(np.random.SeedSequence([run_seed, round_]).generate_state(1, dtype=np.uint64)[0])


def round_closed(round_: int) -> errors.Refusal:
    return errors.conflict(
        "round_closed",
        f"round {round_} closed: its reports were aggregated without this one; poll "
        "GET /v1/rounds/next for the next round",
    )
