"""The progress objective (`scheduler.objective = "progress"`): blocks by expected decrease per
second, coverage only among ties (docs/scheduler.md, "The progress objective"). Pure.

Client n perturbing A_n along z takes one step -eta g z; with the curvature proportional to the
energy (tr H_b ~= c s_b, docs/learning.md) its expected decrease per direction at its best step
is rho_A^2 / (2c), where rho_A = sum_{b in A} rho_b s_b / sum_{b in A} s_b is the signal share
of what it perturbs (zorba_server/block_signal.py). Per second it is r_n rho_A^2 / (2c), r_n the
directions per second it can take. The fleet's sum is separable over clients, and r_n does not
depend on A_n here (a step is dominated by its forward passes, and no measurement yet
separates the perturbation's share: docs/scheduler.md, "Limitations"), so each client's best
assignment is the blocks of the highest signal share it can hold. A weighted mean is largest
on its largest term, so the optimum is the single best block; every block whose share cannot
be told from that one (within TIE_SD standard deviations of their difference) ties with it.

Among its tied blocks a client takes as many as its memory holds (at the fixed step the
clients actually take, below the best step for a small assignment, the decrease grows with
the signal G_A it perturbs), and which ones is decided by coverage: the coverage scheduler's
own stage 1 (scheduler_heuristic.stage1) on the tied pairs only. Before the estimate tells
any block apart (the prior's equal shares), every pair ties and the schedule is stage 1's:
every client full, the least data-weighted coverage maximised, no stage-2 trim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from zorba_server import scheduler_heuristic as heuristic
from zorba_server.scheduler_problem import Problem

TIE_SD = 2.0
"""Two blocks' shares are told apart when they differ by more than this many standard
deviations of their difference (about a 95% two-sided test)."""


def tied_pairs(problem: Problem, rho: Sequence[float] | None, sd: Sequence[float] | None) -> np.ndarray:
    """(N, B) bool: allowed pairs whose block's share ties with the best the client can hold."""
    if rho is None or sd is None:
        return problem.allowed.copy()
    share, spread = np.asarray(rho, dtype=float), np.asarray(sd, dtype=float)
    tied = np.zeros_like(problem.allowed)
    for n in range(problem.num_clients):
        allowed = np.flatnonzero(problem.allowed[n])
        if not allowed.size:
            continue
        best = allowed[np.argmax(share[allowed])]
        gap = share[best] - share[allowed]
        tied[n, allowed] = gap <= TIE_SD * np.sqrt(spread[best] ** 2 + spread[allowed] ** 2)
    return tied


def assign(problem: Problem, rho: Sequence[float] | None, sd: Sequence[float] | None) -> np.ndarray:
    """The progress objective's assignment: each client on the blocks tied with its best,
    filled to its memory, coverage deciding among them."""
    tied = tied_pairs(problem, rho, sd)
    among_ties = dataclasses.replace(problem, allowed=tied,
                                     target=np.minimum(problem.target, tied.sum(axis=0)))
    return heuristic.ensure_min_one(among_ties, heuristic.stage1(among_ties))


def direction_share(rho: Sequence[float], energy: Sequence[float], blocks: Sequence[int]) -> float:
    """rho_A: the signal share of a direction over `blocks` (energy-weighted mean of rho_b)."""
    s = np.asarray(energy, dtype=float)[list(blocks)]
    r = np.asarray(rho, dtype=float)[list(blocks)]
    return float((r * s).sum() / s.sum()) if s.sum() > 0 else 0.0


def fleet_progress(rates: Mapping[str, float], rho: Sequence[float], energy: Sequence[float],
                   assignments: Mapping[str, Sequence[int]]) -> float:
    """sum_n r_n rho_{A_n}^2: the fleet's expected decrease per second, in units of 1 / (2c)."""
    return float(sum(rates[cid] * direction_share(rho, energy, blocks) ** 2
                     for cid, blocks in assignments.items()))
