"""The scheduler's inputs: checked, the clients that cannot take part excluded with the
reason, and the admitted ones built into a `Problem` (scheduler_problem.py). Pure.

`scheduler.py` solves the problem; an exclusion says what the operator can do about it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from zorba_common.errors import AssignmentError
from zorba_server.scheduler_problem import Problem

if TYPE_CHECKING:  # scheduler.py, which defines them, builds on this module
    from zorba_server.scheduler import ClientSpec, SchedulerConfig

MIB = 2**20


def prepare(
    clients: Sequence[ClientSpec],
    block_params: tuple[int, ...],
    cap: float,
    config: SchedulerConfig,
) -> tuple[dict[str, str], list[ClientSpec], Problem]:
    """Check the inputs, exclude who cannot take part, and build the admitted problem."""
    _check_inputs(clients, block_params)
    excluded = _exclusions(clients, block_params, cap, config)
    admitted = [c for c in clients if c.client_id not in excluded]
    return excluded, admitted, _build_problem(admitted, clients, block_params, cap, config)


def _check_inputs(clients: Sequence[ClientSpec], block_params: tuple[int, ...]) -> None:
    if not block_params or min(block_params) <= 0:
        raise ValueError(f"block_params={block_params}: need one positive count per block")
    seen: set[str] = set()
    for c in clients:
        if c.client_id in seen:
            raise ValueError(f"client id {c.client_id!r} appears twice: ids must be unique")
        seen.add(c.client_id)
        if len(c.memory.block_bytes) != len(block_params):
            raise ValueError(
                f"client {c.client_id!r}: its memory model has {len(c.memory.block_bytes)} blocks, "
                f"the model {len(block_params)}; build both from the same ModelFootprint"
            )
        if not (math.isfinite(c.weight) and c.weight >= 0):
            raise ValueError(f"client {c.client_id!r}: weight={c.weight} must be finite and >= 0")
        unknown = sorted(b for b in c.previous if not 0 <= b < len(block_params))
        if unknown:
            raise AssignmentError(
                f"client {c.client_id!r}: previous assignment names blocks {unknown}, "
                f"the model has blocks 0..{len(block_params) - 1}"
            )


def _exclusions(
    clients: Iterable[ClientSpec],
    block_params: tuple[int, ...],
    cap: float,
    config: SchedulerConfig,
) -> dict[str, str]:
    why: dict[str, str] = {}
    for c in clients:
        room = c.budget_bytes - c.memory.fixed_bytes
        fitting = [
            b
            for b, cost in enumerate(c.memory.block_bytes)
            if cost <= room and block_params[b] <= cap
        ]
        if c.weight == 0:
            why[c.client_id] = "it reports no training samples (weight 0): give it data to join"
        elif room < 0:
            why[c.client_id] = (
                f"its budget of {c.budget_bytes / MIB:.0f} MiB (after the run's memory headroom) "
                f"cannot hold the frozen model ({c.memory.fixed_bytes / MIB:.0f} MiB, as its "
                f"measured peaks calibrate it): raise the client's --memory-budget by at least "
                f"{(c.memory.fixed_bytes + min(c.memory.block_bytes, default=0) - c.budget_bytes) / MIB:.0f}"
                " MiB if the device has the memory, free memory, or lower batch_size / seq_len or "
                "the frozen precision"
            )
        elif not fitting and min(block_params) > cap:
            why[c.client_id] = (
                f"every block has more than max_perturbed_params={cap:.0f} parameters "
                f"(smallest {min(block_params)}): raise the cap"
            )
        elif not fitting:
            cheapest = min(
                cost for b, cost in enumerate(c.memory.block_bytes) if block_params[b] <= cap
            )
            why[c.client_id] = (
                f"after the frozen model its budget leaves {room / MIB:.1f} MiB, less than the "
                f"{cheapest / MIB:.1f} MiB its cheapest block needs to train: raise the client's "
                f"--memory-budget by at least {(cheapest - room) / MIB:.1f} MiB if the device has "
                "the memory, free memory, or lower the training precision"
            )
        elif (
            config.round_deadline_s is not None
            and c.step_time_s is not None
            and c.step_time_s * config.min_steps > config.round_deadline_s
        ):
            why[c.client_id] = (
                f"its measured step of {c.step_time_s:.1f} s leaves no room for min_steps="
                f"{config.min_steps} in the {config.round_deadline_s:.1f} s round deadline"
            )
    return why


def _build_problem(
    admitted: Sequence[ClientSpec],
    everyone: Sequence[ClientSpec],
    block_params: tuple[int, ...],
    cap: float,
    config: SchedulerConfig,
) -> Problem:
    num_blocks = len(block_params)
    params = np.asarray(block_params, dtype=float)
    cost = np.array([c.memory.block_bytes for c in admitted], dtype=float).reshape(-1, num_blocks)
    room = np.array([c.budget_bytes - c.memory.fixed_bytes for c in admitted], dtype=float)
    allowed = (cost <= room[:, None]) & (params <= cap)[None, :]
    previous = np.zeros(cost.shape, dtype=bool)
    for i, c in enumerate(admitted):
        previous[i, list(c.previous)] = True
    trained_last_round = np.zeros(num_blocks, dtype=bool)
    for c in everyone:
        trained_last_round[list(c.previous)] = True
    return Problem(
        weights=np.array([c.weight for c in admitted], dtype=float),
        room=room,
        cost=cost,
        params=params,
        cap=cap,
        allowed=allowed,
        previous=previous,
        target=np.minimum(allowed.sum(axis=0), config.min_cover),
        rotate_first=~trained_last_round,
        epsilon=config.epsilon,
        stability_bonus=config.stability_bonus,
    )
