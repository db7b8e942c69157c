"""The greedy scheduler: all of it beyond `milp_max_clients`, the MILP's seed below.

Stage 1 (maximise the least data-weighted coverage t):
  1. `fill`: clients in decreasing weight (the LPT rule for max-min allocation) each take
     the blocks they can afford, least-covered first, blocks still short of their client
     count first. Filling every client is right for stage 1: coverage only grows with a.
  2. `repair_counts`: blocks still short of `target` clients take a client, by a swap
     from a block that has clients to spare if need be.
  3. `raise_minimum`: local search on the least-covered block: shift one client onto it,
     or exchange a heavier client for a lighter one, while that strictly raises the
     sorted coverage vector.
Stage 2 (`trim`): starting from the stage-1 assignment, drop client-block pairs, the
largest blocks and lightest clients first, while every required block keeps coverage
>= (1 - eps) t* and its client count, and every client keeps one block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zorba_server.scheduler_problem import Problem, counts, coverage


class _Usage:
    """Bytes and perturbed parameters each client uses under an assignment."""

    def __init__(self, problem: Problem, a: np.ndarray) -> None:
        self.bytes = (problem.cost * a).sum(axis=1)
        self.params = a.astype(float) @ problem.params

    def fits_swap(
        self, problem: Problem, rows: np.ndarray, add: int, drop: np.ndarray
    ) -> np.ndarray:
        """(len(rows), B) bool: client rows[i] fits block `add` after dropping each block."""
        cost = problem.cost[rows]
        bytes_after = self.bytes[rows, None] - cost + cost[:, [add]]
        params_after = self.params[rows, None] - problem.params[None, :] + problem.params[add]
        return (bytes_after <= problem.room[rows, None]) & (params_after <= problem.cap) & drop

    def fits_add(self, problem: Problem, rows: np.ndarray, add: int) -> np.ndarray:
        return (self.bytes[rows] + problem.cost[rows, add] <= problem.room[rows]) & (
            self.params[rows] + problem.params[add] <= problem.cap
        )

    def move(self, problem: Problem, n: int, add: int | None, drop: int | None) -> None:
        if add is not None:
            self.bytes[n] += problem.cost[n, add]
            self.params[n] += problem.params[add]
        if drop is not None:
            self.bytes[n] -= problem.cost[n, drop]
            self.params[n] -= problem.params[drop]


def fill(problem: Problem) -> np.ndarray:
    """Give every client, heaviest first, the least-covered blocks it can afford."""
    a = np.zeros(problem.cost.shape, dtype=bool)
    cov = np.zeros(problem.num_blocks)
    cnt = np.zeros(problem.num_blocks, dtype=int)
    for n in np.argsort(-problem.weights, kind="stable"):
        blocks = np.flatnonzero(problem.allowed[n])
        deficit = cnt[blocks] < problem.target[blocks]
        # lexsort sorts by its last key first: short blocks, then (among those) blocks idle
        # last round, then least covered, then this client's own last-round blocks, then cheap.
        order = np.lexsort(
            (
                problem.cost[n, blocks],
                ~problem.previous[n, blocks],
                cov[blocks],
                ~(deficit & problem.rotate_first[blocks]),
                ~deficit,
            )
        )
        room, cap = problem.room[n], problem.cap
        for b in blocks[order]:
            if problem.cost[n, b] <= room and problem.params[b] <= cap:
                a[n, b] = True
                room -= problem.cost[n, b]
                cap -= problem.params[b]
        cov += problem.weights[n] * a[n]
        cnt += a[n]
    return a


def repair_counts(problem: Problem, a: np.ndarray) -> np.ndarray:
    """Bring blocks short of their client count up to it, by adding or swapping clients."""
    a = a.copy()
    usage = _Usage(problem, a)
    cnt = counts(a)
    cov = coverage(problem, a)
    short = np.flatnonzero(problem.coverable & (cnt < problem.target))
    for b in short[np.argsort(~problem.rotate_first[short], kind="stable")]:
        while cnt[b] < problem.target[b]:
            rows = np.flatnonzero(problem.allowed[:, b] & ~a[:, b])
            if rows.size == 0:
                break
            free = rows[usage.fits_add(problem, rows, b)]
            drop: int | None = None
            if free.size:
                n = int(free[np.argmax(problem.weights[free])])
            else:
                spare = a[rows] & (~problem.coverable | (cnt > problem.target))[None, :]
                ok = usage.fits_swap(problem, rows, b, spare)
                if not ok.any():
                    break
                # Take from the block that stays best covered after losing the client.
                score = np.where(ok, cov[None, :] - problem.weights[rows, None], -np.inf)
                i, j = np.unravel_index(int(np.argmax(score)), score.shape)
                n, drop = int(rows[i]), int(j)
            a[n, b] = True
            usage.move(problem, n, b, drop)
            cnt[b] += 1
            cov[b] += problem.weights[n]
            if drop is not None:
                a[n, drop] = False
                cnt[drop] -= 1
                cov[drop] -= problem.weights[n]
    return a


def raise_minimum(problem: Problem, a: np.ndarray, required: np.ndarray) -> np.ndarray:
    """Local search on the least-covered required block b0 while a move raises it.

    Two moves, the better one (by the lower of the two touched blocks afterwards) first:
      * shift: a client on a block b' (with clients to spare) and not on b0 moves to b0;
      * exchange: a client n on b' and a lighter client m on b0 trade places, moving
        w_n - w_m of coverage from b' to b0 (the move that fixes what shifts cannot when
        every client is full and the weights are uneven).
    Either adds to b0 and takes from a block that stays above b0's old value, so the
    sorted coverage vector rises strictly and the search ends.
    """
    a = a.copy()
    if not required.any():
        return a
    search = _Search(problem, a, required)
    for _ in range(_MAX_MOVES_PER_PAIR * problem.num_clients * problem.num_blocks + 1):
        if not search.step():
            break
    return search.a


_MAX_MOVES_PER_PAIR = 4


class _Search:
    """State of `raise_minimum`: the assignment and its running totals."""

    def __init__(self, problem: Problem, a: np.ndarray, required: np.ndarray) -> None:
        self.p, self.a, self.required = problem, a, required
        self.usage = _Usage(problem, a)
        self.cov = coverage(problem, a)
        self.cnt = counts(a)
        self.tol = problem.coverage_tolerance()
        self.req = np.flatnonzero(required)

    def step(self) -> bool:
        """Make the best improving move on the least-covered block; False if none."""
        p, a, w = self.p, self.a, self.p.weights
        b0 = int(self.req[np.argmin(self.cov[self.req])])
        t0 = self.cov[b0]
        rows = np.flatnonzero(p.allowed[:, b0] & ~a[:, b0])
        free = rows[self.usage.fits_add(p, rows, b0)]
        if free.size:
            self._shift(int(free[np.argmax(w[free])]), b0, None)
            return True
        # (value, move): a move is ("shift", n, b) or what _best_exchange returns.
        best: tuple[float, tuple[Any, ...] | None] = (t0 + self.tol, None)
        spare = ~self.required | (self.cnt > p.target)
        movable = a[rows] & spare[None, :] & (self.cov[None, :] - w[rows, None] > t0 + self.tol)
        ok = self.usage.fits_swap(p, rows, b0, movable)
        if ok.any():
            value = np.where(
                ok, np.minimum(t0 + w[rows, None], self.cov[None, :] - w[rows, None]), -np.inf
            )
            i, b = np.unravel_index(int(np.argmax(value)), value.shape)
            if value[i, b] > best[0]:
                best = (value[i, b], ("shift", int(rows[i]), int(b)))
        for b in np.flatnonzero(self.cov > t0 + self.tol):
            found = self._best_exchange(b0, int(b))
            if found is not None and found[0] > best[0]:
                best = found
        if best[1] is None:
            return False
        kind, n, b = best[1][0], best[1][1], best[1][2]
        if kind == "shift":
            self._shift(n, b0, b)
        else:
            self._shift(n, b0, b)
            self._shift(best[1][3], b, b0)
        return True

    def _best_exchange(self, b0: int, b: int) -> tuple[float, tuple[Any, ...]] | None:
        """Best pair (n on b, m on b0, w_n > w_m) to trade places, by the value it leaves."""
        p, a, w, t0 = self.p, self.a, self.p.weights, self.cov[b0]
        n_rows = np.flatnonzero(a[:, b] & ~a[:, b0] & p.allowed[:, b0])
        m_rows = np.flatnonzero(a[:, b0] & ~a[:, b] & p.allowed[:, b])
        if n_rows.size == 0 or m_rows.size == 0:
            return None
        n_rows = n_rows[self.usage.fits_swap(p, n_rows, b0, _column(b, p.num_blocks))[:, b]]
        m_rows = m_rows[self.usage.fits_swap(p, m_rows, b, _column(b0, p.num_blocks))[:, b0]]
        if n_rows.size == 0 or m_rows.size == 0:
            return None
        # The ideal exchange moves half the difference; look at the n just below and just
        # above w_m + that half for each m.
        n_rows = n_rows[np.argsort(w[n_rows], kind="stable")]
        wn = w[n_rows]
        ideal = w[m_rows] + (self.cov[b] - t0) / 2
        pos = np.searchsorted(wn, ideal)
        candidates = np.stack([np.clip(pos - 1, 0, wn.size - 1), np.clip(pos, 0, wn.size - 1)])
        moved = wn[candidates] - w[m_rows][None, :]
        value = np.minimum(t0 + moved, self.cov[b] - moved)
        value = np.where((moved > self.tol) & (self.cov[b] - moved > t0 + self.tol), value, -np.inf)
        k, j = np.unravel_index(int(np.argmax(value)), value.shape)
        if not np.isfinite(value[k, j]):
            return None
        return float(value[k, j]), ("exchange", int(n_rows[candidates[k, j]]), b, int(m_rows[j]))

    def _shift(self, n: int, to: int, away: int | None) -> None:
        w = self.p.weights[n]
        self.a[n, to] = True
        self.usage.move(self.p, n, to, away)
        self.cov[to] += w
        self.cnt[to] += 1
        if away is not None:
            self.a[n, away] = False
            self.cov[away] -= w
            self.cnt[away] -= 1


def _column(b: int, num_blocks: int) -> np.ndarray:
    mask = np.zeros(num_blocks, dtype=bool)
    mask[b] = True
    return mask[None, :]


def ensure_min_one(problem: Problem, a: np.ndarray) -> np.ndarray:
    """Give each idle client its cheapest block (it fits alone, and adding never lowers t)."""
    a = a.copy()
    for n in np.flatnonzero(~a.any(axis=1)):
        blocks = np.flatnonzero(problem.allowed[n])
        if blocks.size:
            order = np.lexsort((~problem.previous[n, blocks], problem.params[blocks]))
            a[n, blocks[order[0]]] = True
    return a


def stage1(problem: Problem) -> np.ndarray:
    """A stage-1 assignment: every client full, counts met where it can, minimum raised."""
    a = repair_counts(problem, fill(problem))
    required = problem.coverable & (counts(a) >= problem.target)
    return raise_minimum(problem, a, required)


def trim(problem: Problem, a: np.ndarray, required: np.ndarray, floor: float) -> np.ndarray:
    """Stage 2: drop pairs while required blocks keep coverage >= floor and their counts."""
    a = ensure_min_one(problem, a)
    cov = coverage(problem, a)
    cnt = counts(a)
    held = a.sum(axis=1)
    tol = problem.coverage_tolerance()
    w = problem.weights
    slack = np.where(required, cov - floor + tol, np.inf)
    count_slack = np.where(required, cnt - problem.target, cnt)
    for b in np.argsort(-problem.params, kind="stable"):
        # Drop pairs that earn no stability bonus first, then the rest; lightest first in
        # each group, since a light client uses up least of the block's coverage slack.
        for kept_last_round in (False, True):
            rows = np.flatnonzero(
                a[:, b] & (held > 1) & (problem.previous[:, b] == kept_last_round)
            )
            if rows.size == 0 or count_slack[b] <= 0:
                continue
            rows = rows[np.argsort(w[rows], kind="stable")]
            fits = np.cumsum(w[rows]) <= slack[b]
            k = min(int(fits.sum()), int(count_slack[b]))
            drop = rows[:k]
            a[drop, b] = False
            held[drop] -= 1
            slack[b] -= w[drop].sum()
            count_slack[b] -= k
    return a
