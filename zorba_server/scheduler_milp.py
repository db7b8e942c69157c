"""The scheduler's stages as mixed-integer programs, solved by HiGHS via `scipy.optimize.milp`.

Variables are a[n, b] for the pairs where block b fits client n on its own (the others are
0 and never enter the model), plus t (stage 1) or y[b] (stage 1a). Rows are scaled to
order one: a budget row is divided by the client's room, a coverage row by the largest
reachable coverage, the stage-2 costs by the largest block, so HiGHS' absolute
tolerances mean the same thing whatever the model size or sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, csr_matrix

from zorba_server.scheduler_problem import Problem


@dataclass(frozen=True)
class MilpOutcome:
    a: np.ndarray | None
    """(N, B) bool assignment, or None: nothing as good as the incumbent found in time."""
    optimal: bool
    """HiGHS proved it optimal (within its default relative gap of 1e-4)."""
    bound: float | None
    """HiGHS' proven bound on the stage's objective, in the problem's units."""


class _Pairs:
    """The a[n, b] variables: one per allowed (client, block) pair, then `extra` more."""

    def __init__(self, problem: Problem, extra: int) -> None:
        self.problem = problem
        self.client, self.block = np.nonzero(problem.allowed)
        self.size = int(self.client.size)
        self.num_vars = self.size + extra

    def per_client(self, values: np.ndarray) -> csr_matrix:
        """(N, vars): row n sums values[e] * a_e over client n's pairs."""
        rows = self.problem.num_clients
        return coo_matrix(
            (values, (self.client, np.arange(self.size))), shape=(rows, self.num_vars)
        ).tocsr()

    def per_block(
        self, values: np.ndarray, extra: tuple[np.ndarray, np.ndarray] | None = None
    ) -> csr_matrix:
        """(B, vars): row b sums values[e] * a_e over block b's pairs.

        `extra` = (column offsets, coefficients), one per block, adds one term per row on
        the variables after the pairs (t for every row, or y[b] for row b).
        """
        rows, cols, vals = self.block, np.arange(self.size), values
        if extra is not None:
            offsets, coefs = extra
            rows = np.concatenate([rows, np.arange(self.problem.num_blocks)])
            cols = np.concatenate([cols, self.size + offsets])
            vals = np.concatenate([vals, coefs])
        shape = (self.problem.num_blocks, self.num_vars)
        return coo_matrix((vals, (rows, cols)), shape=shape).tocsr()

    def to_assignment(self, x: np.ndarray) -> np.ndarray:
        a = np.zeros(self.problem.cost.shape, dtype=bool)
        a[self.client, self.block] = x[: self.size] > 0.5
        return a


def _capacity_constraints(pairs: _Pairs) -> list[LinearConstraint]:
    """Memory budget and perturbed-parameter cap, only for clients where they can bind."""
    p = pairs.problem
    constraints = []
    cost = p.cost[pairs.client, pairs.block]
    room = np.maximum(p.room, 1.0)
    budget = pairs.per_client(cost / room[pairs.client])
    binding = np.asarray(budget.sum(axis=1)).ravel() > 1.0
    if binding.any():
        constraints.append(LinearConstraint(budget[binding], -np.inf, 1.0))
    if np.isfinite(p.cap):
        cap = pairs.per_client(p.params[pairs.block] / p.cap)
        binding = np.asarray(cap.sum(axis=1)).ravel() > 1.0
        if binding.any():
            constraints.append(LinearConstraint(cap[binding], -np.inf, 1.0))
    return constraints


def _count_constraint(pairs: _Pairs, required: np.ndarray) -> list[LinearConstraint]:
    p = pairs.problem
    rows = pairs.per_block(np.ones(pairs.size))
    keep = required & (p.target > 0)
    if not keep.any():
        return []
    return [LinearConstraint(rows[keep], p.target[keep].astype(float), np.inf)]


def _coverage_scale(problem: Problem) -> float:
    """Largest coverage any block can reach: divides coverage rows to order one."""
    reach = problem.weights @ problem.allowed
    return float(max(reach.max(initial=0.0), 1e-300))


def _solve(
    c: np.ndarray,
    integrality: np.ndarray,
    bounds: Bounds,
    constraints: list[LinearConstraint],
    time_limit_s: float,
    pairs: _Pairs,
) -> tuple[np.ndarray | None, bool, float | None]:
    """(assignment or None, proven optimal, HiGHS' dual bound on c @ x or None)."""
    options = {"time_limit": max(float(time_limit_s), 1e-3), "disp": False}
    result = milp(
        c, integrality=integrality, bounds=bounds, constraints=constraints, options=options
    )
    bound = getattr(result, "mip_dual_bound", None)
    bound = float(bound) if bound is not None and np.isfinite(bound) else None
    if result.x is None or result.status not in (0, 1):
        return None, False, bound
    return pairs.to_assignment(result.x), result.status == 0, bound


# An incumbent's value becomes a bound on the search; loosened by rounding noise so that
# the incumbent itself stays feasible.
def _loosen_lower(value: float) -> float:
    return value - 1e-9 * abs(value) - 1e-12


def _loosen_upper(value: float) -> float:
    return value + 1e-9 * abs(value) + 1e-12


def cover_set(problem: Problem, at_least: float, time_limit_s: float) -> MilpOutcome:
    """Stage 1a: which blocks to bring to their client count when not all of them can be.

    Maximise sum_b (1 + r_b) y_b (`rotation_score`) with y_b = 1 only if block b has
    target[b] clients, r_b = 0.5 / B for blocks nobody trained last round. `at_least` is
    the heuristic's score: HiGHS only searches for covers at least that good. The
    outcome's assignment meets the counts of (at least) the chosen blocks.
    """
    pairs = _Pairs(problem, extra=problem.num_blocks)
    rotation = 0.5 / problem.num_blocks
    score = 1.0 + rotation * problem.rotate_first
    c = np.concatenate([np.zeros(pairs.size), -score])
    blocks = np.arange(problem.num_blocks)
    link = pairs.per_block(np.ones(pairs.size), (blocks, -problem.target.astype(float)))
    incumbent = np.concatenate([np.zeros(pairs.size), score])[None, :]
    constraints = _capacity_constraints(pairs) + [
        LinearConstraint(link, 0.0, np.inf),
        LinearConstraint(incumbent, _loosen_lower(at_least), np.inf),
    ]
    upper = np.concatenate([np.ones(pairs.size), problem.coverable.astype(float)])
    options = {"time_limit": max(float(time_limit_s), 1e-3), "disp": False}
    result = milp(
        c,
        integrality=np.ones(pairs.num_vars),
        bounds=Bounds(0, upper),
        constraints=constraints,
        options=options,
    )
    if result.x is None or result.status not in (0, 1):
        return MilpOutcome(None, False, None)
    return MilpOutcome(pairs.to_assignment(result.x), result.status == 0, None)


def max_min_coverage(
    problem: Problem, required: np.ndarray, at_least: float, time_limit_s: float
) -> MilpOutcome:
    """Stage 1: max t s.t. sum_n w_n a[n,b] >= t and counts >= target on the required blocks.

    t starts at `at_least` (the heuristic's t), so HiGHS prunes every branch that cannot
    beat it; `bound` is HiGHS' proven upper bound on t*.
    """
    pairs = _Pairs(problem, extra=1)
    scale = _coverage_scale(problem)
    c = np.zeros(pairs.num_vars)
    c[-1] = -1.0
    constraints = _capacity_constraints(pairs) + _count_constraint(pairs, required)
    if required.any():
        t_column = (np.zeros(problem.num_blocks, dtype=int), -np.ones(problem.num_blocks))
        rows = pairs.per_block(problem.weights[pairs.client] / scale, t_column)[required]
        constraints.append(LinearConstraint(rows, 0.0, np.inf))
    integrality = np.concatenate([np.ones(pairs.size), [0]])
    lower = np.concatenate([np.zeros(pairs.size), [max(_loosen_lower(at_least / scale), 0.0)]])
    upper = np.concatenate([np.ones(pairs.size), [np.inf if required.any() else 0.0]])
    a, optimal, bound = _solve(
        c, integrality, Bounds(lower, upper), constraints, time_limit_s, pairs
    )
    return MilpOutcome(a, optimal, None if bound is None else -bound * scale)


def min_perturbed(
    problem: Problem, required: np.ndarray, floor: float, at_most: float, time_limit_s: float
) -> MilpOutcome:
    """Stage 2: min sum (P_b - bonus) a[n,b] s.t. coverage >= floor on required blocks,
    counts >= target, every client on at least one block, budgets and cap.

    `at_most` is the heuristic's objective (HiGHS only looks for better); `bound` is
    HiGHS' proven lower bound on the objective, in parameters.
    """
    pairs = _Pairs(problem, extra=0)
    scale = _coverage_scale(problem)
    unit = max(float(problem.params.max(initial=0.0)), 1.0)
    c = problem.stage2_costs()[pairs.client, pairs.block] / unit
    constraints = _capacity_constraints(pairs) + _count_constraint(pairs, required)
    if required.any():
        rows = pairs.per_block(problem.weights[pairs.client] / scale)[required]
        # The floor is shaded by the coverage tolerance so that an assignment reaching it
        # exactly (eps = 0: the stage-1 optimum itself) is not cut off by rounding.
        rhs = (floor - problem.coverage_tolerance()) / scale
        constraints.append(LinearConstraint(rows, rhs, np.inf))
    constraints.append(LinearConstraint(pairs.per_client(np.ones(pairs.size)), 1.0, np.inf))
    constraints.append(LinearConstraint(c[None, :], -np.inf, _loosen_upper(at_most / unit)))
    a, optimal, bound = _solve(
        c, np.ones(pairs.size), Bounds(0, 1), constraints, time_limit_s, pairs
    )
    return MilpOutcome(a, optimal, None if bound is None else bound * unit)


def coverage_lp_bound(problem: Problem, required: np.ndarray) -> float:
    """Upper bound on t* from stage 1's LP relaxation (a[n,b] in [0, 1]), in weight units.

    Cheap next to the MILP; it certifies the heuristic on federations the MILP cannot
    take: t_heuristic / bound is a lower bound on how close to optimal it is.
    """
    if not required.any():
        return 0.0
    pairs = _Pairs(problem, extra=1)
    scale = _coverage_scale(problem)
    c = np.zeros(pairs.num_vars)
    c[-1] = -1.0
    t_column = (np.zeros(problem.num_blocks, dtype=int), -np.ones(problem.num_blocks))
    rows = pairs.per_block(problem.weights[pairs.client] / scale, t_column)[required]
    constraints = _capacity_constraints(pairs) + _count_constraint(pairs, required)
    constraints.append(LinearConstraint(rows, 0.0, np.inf))
    upper = np.concatenate([np.ones(pairs.size), [np.inf]])
    result = milp(c, bounds=Bounds(0, upper), constraints=constraints)
    if result.status != 0:
        raise RuntimeError(f"the LP relaxation did not solve: {result.message}")
    return float(-result.fun * scale)
