"""The one owner of the zeroth-order step size (pure: no I/O, no clock).

Every number that sets how far a round moves the model is decided here and nowhere else:

    run lr     = run.lr, or with run.step_rule = probe the lr the clients' start-up probes
                 of the task loss give (zorba_server/step_rule.py; run.lr where none did)
    round lr   = run lr x backoff_factor(the closed rounds' statuses)   (x1/2 per rejection,
                                         recovering after sound rounds, never below STEP_FLOOR)
                        x PLATEAU_DECAY ** (plateau cuts so far)
    client lr  = round lr x client scale      (run.lr_scaling: 1; mean block / its blocks;
                                               or all blocks' energy / its blocks' energy)
    local step = client lr x g x z, at most the trust region's length (run.trust_radius x the
                 RMS of the client's perturbed weights; the client applies it, because only
                 it holds the weights: zorba_edge.engine.zo.ZOConfig.for_round)
    readout    = run.readout_lr and run.readout_trust_radius, both x the same factor as the
                 round lr (no lr_scaling): the readout's steps are trust-bound, so a cut of
                 lr alone would not shorten them

The engine asks `StepSize` for the round's settings (`RoundStep`) and each client's scale;
`RoundPlan.client_lr` multiplies them; aggregation adds lr x scale x g per scalar, which is
what the client moved. A restarted server recomputes the same step: the rejections come from
the stored history and the plateau cuts from the last stored plan. docs/learning.md says why
each factor exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from zorba_common.messages import TaskProbe
from zorba_common.readout import READOUT_LR, READOUT_TRUST_RADIUS
from zorba_server.round_status import APPLIED, REJECTED
from zorba_server.step_rule import ProbedStep, probed_lr

LOSS_JUMP_BACKOFF = 0.5
"""The step is multiplied by this for every round the loss guard rejected."""
PLATEAU_DECAY = 0.5
"""... and by this whenever the check losses have not improved for run.plateau_rounds rounds."""
STEP_RECOVERY_ROUNDS = 5
"""Applied rounds in a row after which one halving of the step by a rejection is undone: a
rejection once halved the step for good, and a run whose early rounds were rejected crawled
for the rest of it (issue 27)."""
STEP_FLOOR = 1 / 32
"""The smallest factor rejections bring run.lr to (five halvings): below it a round moves the
model too little to tell, and the guard's rollbacks already keep a step that is too large from
doing harm."""


def backoff_factor(statuses: Iterable[str], backoff: float = LOSS_JUMP_BACKOFF) -> float:
    """The step factor the loss guard's rejections leave after the closed rounds' `statuses`
    (in order): x`backoff` per rejected round, not below STEP_FLOOR; back up by 1/`backoff`
    after every STEP_RECOVERY_ROUNDS applied rounds in a row, up to 1. Derived from the
    history alone, so a restarted server continues with the same step."""
    factor, streak = 1.0, 0
    for status in statuses:
        if status == REJECTED:
            factor, streak = max(STEP_FLOOR, factor * backoff), 0
        elif status == APPLIED:
            streak += 1
            if streak >= STEP_RECOVERY_ROUNDS and factor < 1.0:
                factor, streak = min(1.0, factor / backoff), 0
    return factor


LR_SCALINGS = ("dimension", "energy", "none")
"""run.lr_scaling's choices: `none` one lr for every client; `dimension` lr x mean block size /
the parameters a client perturbs; `energy` lr x the estimated gradient energy of all blocks /
that of the client's blocks (zorba_server/block_energy.py)."""
MAX_ENERGY_SCALE = 32.0
"""The largest `energy` scale, about what parameter counts give a client holding one block of
thirty: one block of little energy would otherwise get hundreds of times the step (the trust
region bounds its length; this bounds it without one)."""


@dataclass(frozen=True)
class RoundStep:
    """The step settings one round hands its clients (HyperParams' lr and radii), after the cuts."""

    lr: float
    trust_radius: float
    readout_lr: float
    readout_trust_radius: float
    readout: bool
    """Whether the run has the label readout (its settings mean nothing otherwise)."""

    def __str__(self) -> str:
        """How a cut's message states the new step."""
        if not self.readout:
            return f"{self.lr:.3g}"
        return (f"{self.lr:.3g} (the readout's lr {self.readout_lr:.3g}, its trust radius "
                f"{self.readout_trust_radius:.3g})")


@dataclass(frozen=True)
class StepSize:
    """The run's step-size settings (from RunConfig) and the rules that turn them into steps."""

    lr: float
    """run.lr: the step before any cut (with `dimension` scaling: a one-average-block client's)."""
    scaling: str = "none"
    trust_radius: float = 0.0
    """Passed to clients in HyperParams; each applies it to its own weights' scale."""
    readout_lr: float = READOUT_LR
    readout_trust_radius: float = READOUT_TRUST_RADIUS
    """The readout's own radius, relative to the label rows' RMS: its steps are trust-bound
    (docs/learning.md, "The label readout in the run")."""
    readout: bool = False
    """Whether the run has the readout (run.readout_directions > 0): only then are its
    settings cut, so a run without it sends them at their defaults, left off the wire."""

    def __post_init__(self) -> None:
        if self.scaling not in LR_SCALINGS:
            raise ValueError(f"lr scaling {self.scaling!r}: use one of {', '.join(LR_SCALINGS)}")

    @staticmethod
    def factor(statuses: Sequence[str], step_decays: int) -> float:
        """What the loss guard's rollbacks (the closed rounds' `statuses`, in order) and the
        plateau cuts have left of run.lr."""
        return backoff_factor(statuses) * PLATEAU_DECAY ** step_decays

    def round_lr(self, statuses: Sequence[str], step_decays: int) -> float:
        """The lr a round opens with (the one every client's scale multiplies)."""
        return self.lr * self.factor(statuses, step_decays)

    def round_step(self, statuses: Sequence[str], step_decays: int) -> RoundStep:
        """Everything a round opens with: its lr, and the readout's lr and trust radius cut by
        the same factor (a trust-bound step ignores a cut of lr; the body's steps rarely are
        on SmolLM2, and its radius stays as set)."""
        factor = self.factor(statuses, step_decays)
        readout = factor if self.readout else 1.0
        return RoundStep(self.lr * factor, self.trust_radius, self.readout_lr * readout,
                         self.readout_trust_radius * readout, self.readout)

    def client_scale(self, block_params: Sequence[int], blocks: Sequence[int],
                     energy: Sequence[float] | None = None) -> float:
        """A client's step scale: 1 (`none`); mean block size / the parameters it perturbs
        (`dimension`; docs/learning.md, "Step size by perturbed dimension"); or (`energy`) the
        gradient energy of all blocks / that of its blocks, at most MAX_ENERGY_SCALE, so that
        `lr` is the step of a client perturbing every block and a client's step falls as the
        E[g^2] of what it perturbs grows (docs/learning.md, "Gradient energy per block": with
        the curvature proportional to the energy, the best step is 1 / (c E[g^2])). Before any
        energy is measured (`energy` None or all zero), parameter counts stand in for it."""
        if self.scaling == "none":
            return 1.0
        if self.scaling == "dimension":
            return (sum(block_params) / len(block_params)) / sum(block_params[b] for b in blocks)
        weights = list(energy) if energy is not None and sum(energy) > 0 else list(block_params)
        held = sum(weights[b] for b in blocks)
        if held <= 0:
            return MAX_ENERGY_SCALE
        return min(sum(weights) / held, MAX_ENERGY_SCALE)

    def probed(self, run_lr: float, sent: Sequence[tuple[str, TaskProbe]], directions: int,
               batch_size: int, block_params: Sequence[int]) -> tuple[StepSize, ProbedStep]:
        """This step size with its lr from the clients' task probes `sent` (step_rule.py), or
        `run_lr` where none is usable; the probe moves every block, so its lr is converted to
        run.lr's unit by the scale a client of every block gets."""
        every = self.client_scale(block_params, range(len(block_params))) if block_params else 1.0
        step = probed_lr(sent, directions, batch_size, self.trust_radius, every)
        return replace(self, lr=run_lr if step.lr is None else step.lr), step

    def after_backoff(self, statuses: Sequence[str], step_decays: int) -> RoundStep:
        """The round's step once one more rejection has halved it (what a rejection message says)."""
        return self.round_step([*statuses, REJECTED], step_decays)

    def after_plateau(self, statuses: Sequence[str], step_decays: int) -> RoundStep:
        """The round's step once one more plateau cut has applied (what a cut message says)."""
        return self.round_step(statuses, step_decays + 1)
