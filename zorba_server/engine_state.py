"""The round engine's state: one run's model, coefficient table, members and rounds.

`EngineState` holds what every part of the round engine reads and writes (`RoundEngine` in
engine.py combines the parts: membership in members.py, planning in planning.py, the close of a
round in round_close.py), and answers what depends on the table alone: the pinned model, the
step of the next round (zorba_server/step_size.py owns it), the published deltas. Pure: no I/O,
no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import AlphaDelta, AlphaState, DeviceProfile, HyperParams, RunInfo
from zorba_common.readout import readout_block, table_columns
from zorba_server import drift_budget, errors
from zorba_server.block_energy import BlockEnergy
from zorba_server.block_signal import BlockSignal, SignalEstimate
from zorba_server.config import ServerConfig
from zorba_server.fluency_watch import FluencyVerdict, Fluent, Reference
from zorba_server.loss_guard import Anchor, Plateau
from zorba_server.modes import MODES, SolveFn
from zorba_server.rounds import APPLIED, CHECKED, FAILED, REJECTED, ReceivedReport, RoundPlan
from zorba_server.safety_state import SafetyState
from zorba_server.scheduler import Schedule
from zorba_server.step_rule import ProbedStep
from zorba_server.step_size import StepSize

if TYPE_CHECKING:  # members.py builds on this module
    from zorba_server.members import Member


@dataclass
class OpenRound:
    plan: RoundPlan
    received: dict[str, ReceivedReport] = field(default_factory=dict)
    """Accepted reports (for the server: committed ones)."""
    _order: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The plan's clients in a fixed order, for `waiting_for`."""
    _look_from: int = field(default=0, init=False, repr=False, compare=False)
    """Where `waiting_for` last found a client waited for: where it looks first next time."""

    def __post_init__(self) -> None:
        self._order = tuple(self.plan.clients)

    def waiting_for(self, expected: Callable[[str], bool]) -> str | None:
        """An assigned client that has not reported and is `expected` to, or None.

        Asked after every report: a scan of the whole plan each time cost O(n^2) per round
        (a seventh of the server's CPU at 1,000 clients, benchmarks/server_load.py). The scan
        starts at the client found last time and goes round the plan once, so None still
        means every client was looked at, and a round of n reports costs O(n) looks in all.
        """
        clients = self._order
        for offset in range(len(clients)):
            at = (self._look_from + offset) % len(clients)
            cid = clients[at]
            if cid not in self.received and expected(cid):
                self._look_from = at
                return cid
        return None


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
    final_check: bool = False
    """The round checked the final version (final_check.py), trained nothing."""


class EngineState:
    """The state of one run, and what the table alone answers."""

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
        loss guard's reference)."""
        self._anchor: Anchor | None = None
        """The last version whose check losses did not rise (zorba_server/loss_guard.py)."""
        self._plateau = Plateau()
        """Rounds without progress on the anchor, and the step cuts they made."""
        self._previous: dict[str, frozenset[int]] = {}
        self.step_size = StepSize(run.lr, run.lr_scaling, run.trust_radius, run.readout_lr,
                                  run.readout_trust_radius, readout=run.readout_directions > 0)
        """The one owner of the step size (zorba_server/step_size.py)."""
        self.probed_step: ProbedStep = ProbedStep(None)
        """The lr the members' task probes give (run.step_rule = probe; zorba_server/
        step_rule.py) and whose probes entered it; None: run.lr stands."""
        self.energy: BlockEnergy | None = None
        """Per-block E[g^2] from the reported scalars (zorba_server/block_energy.py; None until
        the model is pinned)."""
        self.signal: BlockSignal | None = None
        """Per-block signal share from pairs of clients' scalars on common directions
        (zorba_server/block_signal.py; None until the model is pinned)."""
        self.base_rms: tuple[float, ...] | None = None
        """RMS of each block's base weights: what run.max_drift is relative to
        (zorba_server/drift.py), as the clients sent it (the values most agree on:
        base_rms.py), or where a shell that holds the model gives it (the simulator). None:
        the bound is off, whatever run.max_drift says."""
        self.base_rms_ignored: tuple[str, ...] = ()
        """Clients whose base RMS disagreed with the values the run uses."""
        self.fluency_curvature: float | None = None
        """The model's fluency curvature the drift budget is set from (the median of the
        clients' values: drift_budget.py; or the simulator's own probe). None: no budget."""
        self.curvature_ignored: tuple[str, ...] = ()
        """Clients whose fluency curvature stood apart from the run's."""
        self.generic_references: dict[str, Reference] = {}
        """The fluency watch's reference per client (zorba_server/fluency_watch.py)."""
        self.fluent: Fluent | None = None
        """The last version the fluency watch found fluent (None: none judged yet; a broken
        verdict then rolls back to the base model)."""
        self.last_fluency: FluencyVerdict | None = None
        """The watch's last verdict, for the status page."""
        # All of the safety rules' memory above is durable: a shell stores `safety_state()`
        # with each round's close and a restarted engine takes it back (`restore_safety`).

    # ------------------------------------------------------------------ the model and its table

    def pin(self, fingerprint: str, footprint: ModelFootprint,
            alpha: np.ndarray | None = None) -> np.ndarray:
        """Fix the run's model and its coefficient table (zeros unless given); returns the
        table, for a shell to store."""
        if alpha is None:
            alpha = np.zeros((self.pool_size, self.table_columns(footprint)))
        self.fingerprint, self.footprint, self.alpha = fingerprint, footprint, alpha
        self.energy = BlockEnergy(footprint.block_params)
        self.signal = BlockSignal(footprint.num_blocks)
        return alpha

    def pin_first(self, profile: DeviceProfile) -> np.ndarray | None:
        """The first registration pins the run's model: the new table when this one did (a
        shell that fails to store it calls `unpin`), None when the model was pinned already."""
        if self.fingerprint is not None:
            return None
        return self.pin(profile.model_fingerprint, profile.footprint)

    def table_columns(self, footprint: ModelFootprint) -> int:
        """The table's columns for the model: its blocks, and the label readout's when on."""
        return table_columns(footprint.num_blocks, self.config.run.readout_directions)

    def body_alpha(self) -> np.ndarray:
        """The table's columns of the model's blocks (without the readout's), a view; the
        model must be pinned."""
        assert self.alpha is not None and self.footprint is not None
        return self.alpha[:, : self.footprint.num_blocks]

    def readout_block(self) -> int | None:
        """The readout's column R (zorba_common.readout), None while it is off or no model is
        pinned."""
        if self.footprint is None or self.config.run.readout_directions <= 0:
            return None
        return readout_block(self.footprint.num_blocks)

    def unpin(self) -> None:
        self.fingerprint = self.footprint = self.alpha = None

    @property
    def weights_only(self) -> bool:
        """fedavg: training travels as uploaded weights, reports carry no ZO steps."""
        return self.mode.weights_only

    def hyper(self) -> HyperParams:
        run = self.config.run
        step = self.step_size.round_step(*self._cuts())
        return HyperParams(step.lr, run.mu, run.batch_size, run.seq_len, run.estimator,
                           run.directions, step.trust_radius, run.readout_directions,
                           step.readout_lr, step.readout_trust_radius)

    def _cuts(self) -> tuple[tuple[str, ...], int]:
        """(the closed rounds' statuses, plateau cuts): the loss guard's rejections and
        recoveries are derived from the history, the cuts carried by each round's plan, so a
        restarted server continues with the same step."""
        return tuple(h.status for h in self.history), self._plateau.step_decays

    def step_from_probes(self) -> None:
        """With run.step_rule = probe, the run's lr from the members' task probes (run.lr
        where none is usable), set on the step size's owner."""
        run = self.config.run
        if run.step_rule != "probe":
            return
        sent = [(m.client_id, m.profile.task_probe) for m in self.members.values()
                if m.profile.task_probe is not None]
        params = () if self.footprint is None else self.footprint.block_params
        self.step_size, self.probed_step = self.step_size.probed(
            run.lr, sent, run.directions, run.batch_size, params)

    def max_move(self) -> float:
        """The drift budget's bound on each block's RMS move per parameter (0: none)."""
        run = self.config.run
        return drift_budget.max_move(self.fluency_curvature, run.fluency_tolerance, run.drift_budget)

    def lr_factor(self) -> float:
        """What the cuts have left of run.lr (StepSize.factor)."""
        return self.step_size.factor(*self._cuts())

    def signal_estimate(self) -> SignalEstimate | None:
        """Each block's signal share rho_b given the energies (None before the model is pinned)."""
        if self.signal is None or self.energy is None:
            return None
        return self.signal.estimate(self.energy.estimate())

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
        return AlphaState(run_id, self.version, self.pool_size, self.alpha.shape[1],
                          np.ascontiguousarray(self.alpha, dtype="<f8").tobytes())

    @property
    def rounds_applied(self) -> int:
        """Rounds whose update was applied (from the history, so it survives a restart). Not
        the version: a rolled-back round publishes a version too, and run.max_rounds counts
        applied rounds."""
        return sum(1 for h in self.history if h.status == APPLIED)

    def counters(self) -> dict[str, int]:
        """The run's totals: reports booked, closed rounds by outcome (derived from the
        history, so they survive a restart), and this engine's scheduler runs."""
        def closed(status: str) -> int:
            return sum(1 for h in self.history if h.status == status)

        return {"reports_accepted": self.reports_accepted, "rounds_applied": self.rounds_applied,
                "rounds_rejected": closed(REJECTED), "rounds_failed": closed(FAILED),
                "rounds_checked": closed(CHECKED), "schedules_solved": self.schedules_solved}

    # ------------------------------------------------------------------ the safety rules' memory

    def safety_state(self) -> SafetyState:
        """What the loss guard and the fluency watch remember (safety_state.py)."""
        return SafetyState(self._anchor, self.fluent, dict(self.generic_references),
                           self._plateau, dict(self._reference_losses), self.last_fluency)

    @property
    def safety_measured(self) -> bool:
        """Some client has sent what the safety rules read (a check or generic-text loss)."""
        return self._anchor is not None or bool(self.generic_references)

    def restore_safety(self, state: SafetyState) -> None:
        """Take back what `safety_state` gave (after a round's close, or a restart)."""
        self._anchor, self.fluent = state.anchor, state.fluent
        self.generic_references = dict(state.references)
        self._plateau, self._reference_losses = state.plateau, dict(state.reference_losses)
        self.last_fluency = state.last_fluency

    # ------------------------------------------------------------------ the published deltas

    def deltas_since(self, version: int) -> tuple[tuple[AlphaDelta, ...], bool]:
        """The published deltas after `version`, or catch_up=True when they are no longer kept."""
        gap = self.version - version
        if gap <= 0:
            return (), False
        if gap > len(self.deltas):
            return (), True
        return tuple(self.deltas)[-gap:], False
