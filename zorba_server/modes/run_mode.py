"""What a run mode is to the server: how it plans a round and what its rounds carry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zorba_server.scheduler import ClientSpec, Schedule, SchedulerConfig

SolveFn = Callable[[Sequence[ClientSpec], Sequence[int], SchedulerConfig, int], Schedule]
"""solve(clients, block_params, config, round_seed) -> Schedule (see scheduler_baselines)."""


@dataclass(frozen=True)
class RunMode:
    """One value of `run.mode` (zorba_common.run_defaults.RUN_MODES names them on the wire)."""

    name: str
    summary: str
    """One line for `zorba-server --help`: what the mode trains, and how."""
    solve: SolveFn
    """Who trains which blocks in a round."""
    redraws_each_round: bool = False
    """The assignment is drawn anew every round (from the round's seed, so a restarted server
    draws the same blocks); otherwise a schedule is reused until membership changes."""
    weights_only: bool = False
    """Training travels as uploaded weights: reports carry no ZO steps, the server averages
    the weight files (zorba_server/weight_rounds.py)."""
    enforces_budget: bool = True
    """Registration refuses a device whose budget cannot hold a single block."""
