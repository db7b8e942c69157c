"""Assignments of the baselines ZorBA is measured against (issue 5), as pure functions.

- `full_schedule` (fedzo-full, the FedKSeed/DeComFL family): every client perturbs every
  block; a client that cannot hold the whole model in its training precision takes no part.
- `uniform_schedule` (zorba-uniform): every admitted client trains the same number of
  blocks, chosen at random, the most that every one of them can hold. It isolates what the
  scheduler's optimisation adds over a naive heterogeneous activation.

They return the scheduler's `Schedule`, so the coordinator and the accounting treat every
mode alike; their `method` names the mode. Each mode's file in zorba_server/modes/ names its solver.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from zorba_server.scheduler import (
    MIB,
    ClientSpec,
    Schedule,
    SchedulerConfig,
    solve_schedule,
)

Choose = Callable[[ClientSpec, int], tuple[int, ...] | None]
"""blocks a client trains in this mode, or None when it cannot take part."""


def full_schedule(
    clients: Sequence[ClientSpec], block_params: Sequence[int], config: SchedulerConfig,
    round_seed: int = 0,
) -> Schedule:
    """Every block on every client that can hold them all."""
    every = tuple(range(len(block_params)))

    def choose(client: ClientSpec, _: int) -> tuple[int, ...] | None:
        return every if client.memory.total(every) <= client.budget_bytes else None

    return _schedule("full", clients, block_params, config, choose,
                     why_not="it cannot hold every block at training precision")


def uniform_schedule(
    clients: Sequence[ClientSpec], block_params: Sequence[int], config: SchedulerConfig,
    round_seed: int = 0,
) -> Schedule:
    """The same number of random blocks on every client: the most the tightest client holds."""
    admitted = solve_schedule(clients, block_params, config)  # the scheduler's own admission
    count = min((_blocks_within(c) for c in clients if c.client_id in admitted.assignments),
                default=0)
    num_blocks = len(block_params)

    def choose(client: ClientSpec, _: int) -> tuple[int, ...] | None:
        if client.client_id not in admitted.assignments or count == 0:
            return None
        rng = np.random.default_rng([round_seed, zlib.crc32(client.client_id.encode())])
        return tuple(sorted(int(b) for b in rng.choice(num_blocks, count, replace=False)))

    reasons = dict(admitted.excluded_clients)
    return _schedule("uniform", clients, block_params, config, choose,
                     why_not="it cannot hold a block", reasons=reasons)


def fedavg_schedule(
    clients: Sequence[ClientSpec], block_params: Sequence[int], config: SchedulerConfig,
    round_seed: int = 0,
) -> Schedule:
    """Every block on every client, budgets or not: FedAvg has no way to train less, so the
    baseline runs everywhere and its measured peaks show which budgets it would break."""
    every = tuple(range(len(block_params)))
    return _schedule("fedavg", clients, block_params, config, lambda _c, _n: every,
                     why_not="")


def _blocks_within(client: ClientSpec) -> int:
    """How many blocks the client holds whichever it is given (counted dearest first)."""
    room = client.budget_bytes - client.memory.fixed_bytes
    costs = sorted(client.memory.block_bytes, reverse=True)
    held = 0
    for cost in costs:
        if cost > room:
            break
        room -= cost
        held += 1
    return held


def _schedule(
    method: str, clients: Sequence[ClientSpec], block_params: Sequence[int],
    config: SchedulerConfig, choose: Choose, *, why_not: str,
    reasons: dict[str, str] | None = None,
) -> Schedule:
    started = time.perf_counter()
    params = tuple(int(p) for p in block_params)
    assignments: dict[str, tuple[int, ...]] = {}
    excluded: dict[str, str] = {}
    for client in clients:
        blocks = choose(client, len(params))
        if blocks:
            assignments[client.client_id] = blocks
        else:
            excluded[client.client_id] = (reasons or {}).get(client.client_id) or (
                f"{why_not}: its budget is {client.budget_bytes / MIB:.0f} MiB")
    weights = {c.client_id: c.weight for c in clients}
    cover = np.zeros(len(params))
    for cid, blocks in assignments.items():
        cover[list(blocks)] += weights[cid]
    by_id = {c.client_id: c for c in clients}
    return Schedule(
        assignments=assignments,
        coverage=float(cover.min()),
        stage1_coverage=float(cover.min()),
        block_coverage=tuple(float(x) for x in cover),
        required_blocks=tuple(range(len(params))),
        uncovered_blocks={b: f"the {method} assignment left it to no client"
                          for b in range(len(params)) if cover[b] == 0},
        excluded_clients=excluded,
        stage1_bound=None,
        method=method,
        optimal=False,
        solve_s=time.perf_counter() - started,
        perturbed_params={cid: sum(params[b] for b in blocks) for cid, blocks in assignments.items()},
        memory_bytes={cid: by_id[cid].memory.total(blocks) for cid, blocks in assignments.items()},
    )
