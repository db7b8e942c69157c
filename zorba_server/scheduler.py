"""Heterogeneous block activation: which blocks each client trains this round (docs/design.md §5).

Pure functions, no I/O. `solve_schedule` takes the round's clients (budget, linear memory
model, sample weight, measured step time, last round's assignment) and the model's block
sizes, and returns a `Schedule`:

  * clients that cannot take part are excluded with the reason (frozen model over budget,
    no block fits, no samples, too slow for the round deadline);
  * stage 1 maximises t, the least data-weighted coverage sum_n w_n a[n,b] over the
    blocks, with every block on at least `min_cover` clients where the federation can;
  * stage 2 keeps t >= (1 - epsilon) t* and minimises the perturbed parameters, less a
    small bonus for keeping last round's pairs, with every client on at least one block.

The greedy of `scheduler_heuristic` always runs (milliseconds to a second). Up to
`milp_max_clients` admitted clients, each stage is then also a MILP (scipy/HiGHS,
`scheduler_milp`) seeded with the heuristic's value as a bound, under `time_limit_s`:
the schedule returned is never worse than the greedy one, and optimal where HiGHS
proves it. docs/scheduler.md has the formulation, the reasons and the measurements.

That is `objective = "coverage"` (the default). Under `objective = "progress"` the two stages
are replaced by scheduler_progress.assign: each client on the blocks of the highest estimated
signal share it can hold, coverage deciding only among ties.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from zorba_common.memory_model import LinearMemoryModel
from zorba_server import scheduler_heuristic as heuristic
from zorba_server import scheduler_milp as exact
from zorba_server import scheduler_progress as progress
from zorba_server.scheduler_inputs import MIB, prepare
from zorba_server.scheduler_problem import (
    Problem,
    coverage,
    meets_target,
    min_coverage,
    rotation_score,
    stage2_objective,
    violations,
)


@dataclass(frozen=True)
class ClientSpec:
    """What the scheduler knows about one client this round."""

    client_id: str
    budget_bytes: int
    """Memory the client may use (its measured free memory less its safety margin)."""
    memory: LinearMemoryModel
    """The client's own linear memory model (its settings and calibration)."""
    weight: float
    """Sample count w_n: the client's weight in coverage and in aggregation."""
    step_time_s: float | None = None
    """Measured seconds per local step last round (None: not measured yet)."""
    previous: frozenset[int] = frozenset()
    """Blocks it trained last round."""


OBJECTIVES = ("coverage", "progress")
"""What the scheduler maximises (docs/scheduler.md)."""


@dataclass(frozen=True)
class SchedulerConfig:
    min_cover: int = 1
    """Clients each block should have (fewer where fewer can hold it; those are named)."""
    epsilon: float = 0.05
    """Stage 2 may give up this fraction of the stage-1 coverage t* to save parameters."""
    max_perturbed_params: int | None = None
    """Cap on the parameters one client perturbs (ZO variance grows with the dimension)."""
    stability_bonus: float = 0.1
    """Fraction of a block's size credited for keeping a pair from last round, in [0, 1)."""
    time_limit_s: float = 10.0
    """Wall-clock budget of all MILP stages together."""
    milp_max_clients: int = 32
    """Above this many admitted clients, the greedy heuristic alone (measured: see docs)."""
    round_deadline_s: float | None = None
    """Compute time a client has per round; with one, a client too slow for min_steps in it
    is excluded. (The round engine sets it and the step bounds from the run, and gives each
    admitted client its steps with `local_steps`.)"""
    min_steps: int = 1
    max_steps: int = 32
    objective: str = "coverage"
    """`coverage`: stage 1 maximises the least data-weighted coverage, stage 2 trims
    (docs/scheduler.md). `progress`: each client on the blocks of the highest signal share it
    can hold, coverage only among ties (zorba_server/scheduler_progress.py)."""
    signal_share: tuple[float, ...] | None = None
    """rho_b per block, and below its standard deviation: the round engine's estimate
    (zorba_server/block_signal.py), set each round where the objective is `progress`."""
    signal_sd: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.objective in OBJECTIVES,
             f"objective={self.objective!r}: use one of {', '.join(OBJECTIVES)}"),
            ((self.signal_share is None) == (self.signal_sd is None),
             "signal_share and signal_sd come together"),
            (self.min_cover >= 1, f"min_cover={self.min_cover}: must be >= 1"),
            (0.0 <= self.epsilon < 1.0, f"epsilon={self.epsilon}: must be in [0, 1)"),
            (
                self.max_perturbed_params is None or self.max_perturbed_params > 0,
                f"max_perturbed_params={self.max_perturbed_params}: must be > 0 or None",
            ),
            (
                0.0 <= self.stability_bonus < 1.0,
                f"stability_bonus={self.stability_bonus}: must be in [0, 1) so that it only "
                "breaks ties and never keeps a block a client does not need",
            ),
            (self.time_limit_s > 0, f"time_limit_s={self.time_limit_s}: must be > 0"),
            (self.milp_max_clients >= 0, "milp_max_clients must be >= 0"),
            (
                self.round_deadline_s is None or self.round_deadline_s > 0,
                f"round_deadline_s={self.round_deadline_s}: must be > 0 or None",
            ),
            (
                1 <= self.min_steps <= self.max_steps,
                f"min_steps={self.min_steps}, max_steps={self.max_steps}: "
                "need 1 <= min_steps <= max_steps",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Schedule:
    assignments: dict[str, tuple[int, ...]]
    """Admitted client -> blocks it trains (sorted). Every admitted client has >= 1."""
    coverage: float
    """t: least data-weighted coverage over the required blocks, in units of weight."""
    stage1_coverage: float
    """t*: the stage-1 optimum (or best found) that stage 2 kept within epsilon of."""
    block_coverage: tuple[float, ...]
    """Data-weighted coverage of every block."""
    required_blocks: tuple[int, ...]
    """Blocks held to the coverage floor and client count (t is their minimum)."""
    uncovered_blocks: dict[int, str]
    """Blocks with fewer than min_cover clients -> why."""
    excluded_clients: dict[str, str]
    """Clients left out of this round -> why, and what would let them in."""
    stage1_bound: float | None
    """Proven upper bound on t* (HiGHS' dual bound; = t* when optimal); None: heuristic path."""
    method: str
    """'milp': MILP stages seeded with the heuristic (small federations); 'heuristic'."""
    optimal: bool
    """Both stages proven optimal by HiGHS (lexicographically optimal schedule)."""
    solve_s: float
    perturbed_params: dict[str, int]
    memory_bytes: dict[str, int]
    """Predicted peak bytes of each admitted client under its assignment."""


def local_steps(
    step_time_s: float | None, deadline_s: float | None, *, min_steps: int = 1, max_steps: int = 32
) -> int:
    """Local steps that fit the round deadline, clamped to [min_steps, max_steps].

    No measured step time yet: min_steps (the first round measures it). No deadline:
    max_steps. A client too slow for even min_steps is the scheduler's to exclude;
    this function never returns fewer than min_steps.
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps ({min_steps}) <= max_steps ({max_steps})")
    if deadline_s is None:
        return max_steps
    if not (math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"deadline_s={deadline_s}: must be a positive number of seconds")
    if step_time_s is None:
        return min_steps
    if not (math.isfinite(step_time_s) and step_time_s > 0):
        raise ValueError(f"step_time_s={step_time_s}: must be a positive number of seconds")
    return int(min(max(math.floor(deadline_s / step_time_s), min_steps), max_steps))


def solve_schedule(
    clients: Sequence[ClientSpec], block_params: Sequence[int], config: SchedulerConfig,
    round_seed: int = 0,
) -> Schedule:
    """Assign blocks to clients for one round (see the module docstring); deterministic, so
    `round_seed` (which the baselines' random draws use) is not needed."""
    started = time.perf_counter()
    block_params = tuple(int(p) for p in block_params)
    cap = math.inf if config.max_perturbed_params is None else float(config.max_perturbed_params)
    excluded, admitted, problem = prepare(clients, block_params, cap, config)
    result = (_solve_progress(problem, config) if config.objective == "progress"
              else _solve(problem, config, started))

    a, required = result.a, result.required
    cov = coverage(problem, a)
    assignments = {
        c.client_id: tuple(int(b) for b in np.flatnonzero(a[i])) for i, c in enumerate(admitted)
    }
    return Schedule(
        assignments=assignments,
        coverage=min_coverage(problem, a, required),
        stage1_coverage=result.stage1_coverage,
        stage1_bound=result.stage1_bound,
        block_coverage=tuple(float(x) for x in cov),
        required_blocks=tuple(int(b) for b in np.flatnonzero(required)),
        uncovered_blocks=_uncovered(problem, a, required, admitted, block_params, cap, config,
                                    LEFT_OUT_WHY[config.objective]),
        excluded_clients=excluded,
        method=result.method,
        optimal=result.optimal,
        solve_s=time.perf_counter() - started,
        perturbed_params={
            cid: sum(block_params[b] for b in blocks) for cid, blocks in assignments.items()
        },
        memory_bytes={c.client_id: c.memory.total(assignments[c.client_id]) for c in admitted},
    )


def coverage_upper_bound(
    clients: Sequence[ClientSpec],
    block_params: Sequence[int],
    config: SchedulerConfig,
    required_blocks: Iterable[int],
) -> float:
    """An upper bound on the stage-1 optimum t* for `required_blocks` (a Schedule's
    `required_blocks`), from the LP relaxation: how far from optimal a schedule can be."""
    block_params = tuple(int(p) for p in block_params)
    cap = math.inf if config.max_perturbed_params is None else float(config.max_perturbed_params)
    problem = prepare(clients, block_params, cap, config)[2]
    required = np.isin(np.arange(len(block_params)), list(required_blocks))
    return exact.coverage_lp_bound(problem, required)


# --- solving ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Result:
    a: np.ndarray
    required: np.ndarray
    stage1_coverage: float
    stage1_bound: float | None
    method: str
    optimal: bool


def _solve(problem: Problem, config: SchedulerConfig, started: float) -> _Result:
    """The heuristic always; then, for small federations, the MILP stages seeded with it.

    Each MILP stage is given the heuristic's value as a bound (t >= t_h, objective <=
    the trim's), so it only searches for something better and the result is never worse
    than the heuristic's, even when HiGHS runs out of time.
    """
    a1 = heuristic.stage1(problem)
    required = meets_target(problem, a1)
    t_star = min_coverage(problem, a1, required)
    use_milp = 0 < problem.num_clients <= config.milp_max_clients
    deadline = started + config.time_limit_s
    stage1_optimal, t_bound = False, None
    if use_milp:
        cover_optimal = True
        if not (required == problem.coverable).all():
            score = rotation_score(problem, required)
            cover = exact.cover_set(problem, score, _share(deadline, 1 / 3))
            cover_optimal = cover.optimal
            if cover.a is not None:
                found = meets_target(problem, cover.a)
                if rotation_score(problem, found) > score + 1e-12:
                    required = found
                    a1 = heuristic.raise_minimum(problem, cover.a, required)
                    t_star = min_coverage(problem, a1, required)
        stage1 = exact.max_min_coverage(problem, required, t_star, _share(deadline, 1 / 2))
        if stage1.a is not None and _stage1_valid(problem, stage1.a, required):
            t = min_coverage(problem, stage1.a, required)
            # Only a strictly better t replaces the heuristic's assignment: at equal t the
            # heuristic's (every client full, balanced) trims to fewer parameters.
            if t > t_star + problem.coverage_tolerance():
                a1, t_star = stage1.a, t
        stage1_optimal = stage1.optimal and cover_optimal
        t_bound = t_star if stage1_optimal else stage1.bound
    floor = (1.0 - problem.epsilon) * t_star

    # The greedy trim of the stage-1 assignment is always valid: it is the fallback and
    # the bar an exact stage 2 must clear.
    best = heuristic.trim(problem, a1, required, floor)
    optimal = False
    if use_milp:
        stage2 = exact.min_perturbed(
            problem, required, floor, stage2_objective(problem, best), _share(deadline, 1)
        )
        if (
            stage2.a is not None
            and _stage2_valid(problem, stage2.a, required, floor)
            and stage2_objective(problem, stage2.a) <= stage2_objective(problem, best)
        ):
            best = stage2.a
        optimal = stage1_optimal and stage2.optimal
    if problem.num_clients and not _stage2_valid(problem, best, required, floor):
        raise AssertionError(
            f"scheduler produced an invalid assignment: {violations(problem, best)}"
        )
    method = "milp" if use_milp else "heuristic"
    return _Result(best, required, t_star, t_bound, method, optimal)


def _solve_progress(problem: Problem, config: SchedulerConfig) -> _Result:
    """The progress objective (scheduler_progress.py): no MILP, no stage-2 trim."""
    a = progress.assign(problem, config.signal_share, config.signal_sd)
    if problem.num_clients and violations(problem, a):
        raise AssertionError(f"scheduler produced an invalid assignment: {violations(problem, a)}")
    required = meets_target(problem, a)
    t = min_coverage(problem, a, required)
    return _Result(a, required, t, None, "progress", False)


def _share(deadline: float, fraction: float) -> float:
    """This stage's time: `fraction` of what is left before the deadline."""
    return max(deadline - time.perf_counter(), 0.0) * fraction


def _stage1_valid(problem: Problem, a: np.ndarray, required: np.ndarray) -> bool:
    return not violations(problem, a, min_one=False) and bool(
        (meets_target(problem, a) | ~required).all()
    )


def _stage2_valid(problem: Problem, a: np.ndarray, required: np.ndarray, floor: float) -> bool:
    if violations(problem, a) or not (meets_target(problem, a) | ~required).all():
        return False
    return min_coverage(problem, a, required) >= floor - problem.coverage_tolerance()


LEFT_OUT_WHY = {
    "coverage": "the federation's memory cannot bring every block to min_cover this round; "
                "blocks left out are covered first next round",
    "progress": "the progress objective left it out: every client that can hold it holds blocks "
                "of a higher signal share (block_signal on /v1/status) or the memory for it is "
                "used by tied blocks covered less",
}
"""Why a coverable block has fewer than its target of clients, by objective."""


# --- reporting --------------------------------------------------------------------------


def _uncovered(
    problem: Problem,
    a: np.ndarray,
    required: np.ndarray,
    admitted: Sequence[ClientSpec],
    block_params: tuple[int, ...],
    cap: float,
    config: SchedulerConfig,
    left_out_why: str,
) -> dict[int, str]:
    why: dict[int, str] = {}
    held = a.sum(axis=0)
    for b in range(problem.num_blocks):
        if held[b] >= config.min_cover:
            continue
        if not admitted:
            why[b] = "no client was admitted this round (see excluded_clients)"
        elif block_params[b] > cap:
            why[b] = (
                f"it has {block_params[b]} parameters, over max_perturbed_params={cap:.0f}: "
                "raise the cap to train it"
            )
        elif problem.target[b] == 0:
            most_room = max(c.budget_bytes - c.memory.fixed_bytes for c in admitted)
            need = min(c.memory.block_bytes[b] for c in admitted)
            why[b] = (
                f"no admitted client can hold it: training it needs {need / MIB:.1f} MiB beyond "
                f"the frozen model, the roomiest client has {most_room / MIB:.1f} MiB"
            )
        elif problem.target[b] < config.min_cover:
            why[b] = (
                f"only {int(problem.target[b])} admitted client(s) can hold it, "
                f"min_cover={config.min_cover}"
            )
        elif not required[b]:
            why[b] = left_out_why
        else:
            raise AssertionError(f"required block {b} has {held[b]} clients, below its target")
    return why
