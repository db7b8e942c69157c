"""One scheduling instance as arrays, and the measures both solvers are judged by.

`scheduler_inputs.py` builds a `Problem` from the public inputs (after excluding the clients
that cannot take part); `scheduler_milp.py` and `scheduler_heuristic.py` each turn it into
an assignment matrix `a[n, b]` (bool, clients x blocks). Everything that defines what a
*good* assignment is (feasibility, coverage, the stage-2 objective) lives here, once, so
the two solvers, the tests and the benchmark cannot disagree about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Coverage comparisons are between sums of float weights; two sums of the same weights in
# another order can differ in the last bits. Relative to the total weight, this is far
# below one client's share in any real federation.
COVERAGE_RTOL = 1e-9


@dataclass(frozen=True)
class Problem:
    """The admitted clients of one round (n) and the model's blocks (b)."""

    weights: np.ndarray
    """(N,) float: sample weight w_n."""
    room: np.ndarray
    """(N,) float: budget minus the client's fixed bytes (>= 0 for admitted clients)."""
    cost: np.ndarray
    """(N, B) float: bytes client n needs on top of `fixed` to train block b."""
    params: np.ndarray
    """(B,) float: parameters P_b of each block."""
    cap: float
    """Most parameters one client may perturb (inf: no cap)."""
    allowed: np.ndarray
    """(N, B) bool: block b fits client n on its own (budget and cap)."""
    previous: np.ndarray
    """(N, B) bool: client n trained block b last round."""
    target: np.ndarray
    """(B,) int: clients required on block b, min(min_cover, clients that can hold b)."""
    rotate_first: np.ndarray
    """(B,) bool: blocks nobody trained last round (covered first when capacity is short)."""
    epsilon: float
    stability_bonus: float

    @property
    def num_clients(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.params.shape[0])

    @property
    def coverable(self) -> np.ndarray:
        """(B,) bool: blocks at least one admitted client can hold."""
        return self.target > 0

    def coverage_tolerance(self) -> float:
        return COVERAGE_RTOL * max(float(self.weights.sum()), 1.0)

    def stage2_costs(self) -> np.ndarray:
        """(N, B): what keeping a[n,b] = 1 costs in stage 2, in parameters.

        P_b, less a bonus of `stability_bonus * P_b` where the client trained b last round.
        The bonus is below P_b (stability_bonus < 1), so it breaks ties towards last
        round's assignment but never makes a client keep a block it does not need.
        """
        bonus = self.stability_bonus * self.previous
        return self.params[None, :] * (1.0 - bonus)


def coverage(problem: Problem, a: np.ndarray) -> np.ndarray:
    """(B,) data-weighted coverage sum_n w_n a[n, b]."""
    return problem.weights @ a


def counts(a: np.ndarray) -> np.ndarray:
    """(B,) number of clients on each block."""
    return a.sum(axis=0)


def meets_target(problem: Problem, a: np.ndarray) -> np.ndarray:
    """(B,) bool: coverable blocks whose client count reaches their target."""
    return problem.coverable & (counts(a) >= problem.target)


def min_coverage(problem: Problem, a: np.ndarray, required: np.ndarray) -> float:
    """t: the least coverage over the required blocks (0 when none is required)."""
    if not required.any():
        return 0.0
    return float(coverage(problem, a)[required].min())


def stage2_objective(problem: Problem, a: np.ndarray) -> float:
    """Perturbed parameters minus the stability bonus: what stage 2 minimises."""
    return float((problem.stage2_costs() * a).sum())


def rotation_score(problem: Problem, covered: np.ndarray) -> float:
    """Stage 1a's objective: blocks covered, plus a tie-break for blocks idle last round.

    Each idle block adds 0.5 / B, so all of them together weigh less than one block:
    the count of covered blocks always comes first, rotation only breaks ties.
    """
    bonus = 0.5 / max(problem.num_blocks, 1)
    return float(covered.sum() + bonus * (covered & problem.rotate_first).sum())


def violations(problem: Problem, a: np.ndarray, *, min_one: bool = True) -> list[str]:
    """What makes `a` infeasible (empty when it respects every hard constraint)."""
    problems: list[str] = []
    if a.shape != problem.cost.shape:
        return [f"assignment shaped {a.shape}, expected {problem.cost.shape}"]
    if (a & ~problem.allowed).any():
        n, b = np.argwhere(a & ~problem.allowed)[0]
        problems.append(f"client {n} holds block {b}, which does not fit it on its own")
    used = (problem.cost * a).sum(axis=1)
    over = np.flatnonzero(used > problem.room * (1 + 1e-12))
    if over.size:
        problems.append(f"clients {over.tolist()} exceed their memory budget")
    perturbed = a @ problem.params
    over_cap = np.flatnonzero(perturbed > problem.cap * (1 + 1e-12))
    if over_cap.size:
        problems.append(f"clients {over_cap.tolist()} exceed the perturbed-parameter cap")
    if min_one:
        idle = np.flatnonzero(~a.any(axis=1))
        if idle.size:
            problems.append(f"clients {idle.tolist()} train no block")
    return problems
