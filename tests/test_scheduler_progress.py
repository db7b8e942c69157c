"""The progress objective (zorba_server/scheduler_progress.py): blocks by signal share, coverage
only among blocks whose shares cannot be told apart."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from engine_fakes import engine, join, open_next, received
from test_scheduler import HEURISTIC, check_feasible, client, random_clients

from zorba_server.config import ConfigError, config_from_dict
from zorba_server.scheduler import SchedulerConfig, solve_schedule
from zorba_server.scheduler_progress import fleet_progress
from zorba_server.status_page import render
from zorba_server.status_view import run_status

PROGRESS = SchedulerConfig(objective="progress")
BLOCKS = [10] * 6


def _fleet() -> list:
    # rooms for 1, 2, 4 and 6 blocks of cost 10
    return [client(f"c{i}", 100 + 10 * k, 100, (10,) * 6, weight=float(i + 1))
            for i, k in enumerate((1, 2, 4, 6))]


def test_without_an_estimate_every_client_is_filled_and_coverage_decides() -> None:
    clients = _fleet()
    schedule = solve_schedule(clients, BLOCKS, PROGRESS)
    check_feasible(schedule, clients, BLOCKS, PROGRESS)
    assert schedule.method == "progress"
    # no stage-2 trim: each client holds all its memory allows
    assert [len(schedule.assignments[f"c{i}"]) for i in range(4)] == [1, 2, 4, 6]
    assert not schedule.uncovered_blocks
    coverage = solve_schedule(clients, BLOCKS, HEURISTIC)
    assert schedule.coverage >= coverage.stage1_coverage - 1e-9  # stage 1's max-min, untrimmed


def test_blocks_told_apart_by_their_share_take_every_client_that_can_hold_them() -> None:
    clients = _fleet()
    rho = (0.05, 0.05, 0.6, 0.55, 0.05, 0.05)
    config = SchedulerConfig(objective="progress", signal_share=rho, signal_sd=(0.02,) * 6)
    schedule = solve_schedule(clients, BLOCKS, config)
    check_feasible(schedule, clients, BLOCKS, config)
    # blocks 2 and 3 tie (0.05 apart, 2 sd of the difference is 0.057); the rest are far below
    assert all(set(blocks) <= {2, 3} for blocks in schedule.assignments.values())
    assert schedule.assignments["c0"] in ((2,), (3,)) and schedule.assignments["c3"] == (2, 3)
    assert set(schedule.uncovered_blocks) == {0, 1, 4, 5}
    assert "progress objective" in schedule.uncovered_blocks[0]
    energy, rates = [1.0] * 6, {c.client_id: 1.0 for c in clients}
    covered = solve_schedule(clients, BLOCKS, HEURISTIC).assignments
    assert fleet_progress(rates, rho, energy, schedule.assignments) > fleet_progress(
        rates, rho, energy, covered)


def test_shares_within_their_uncertainty_tie_and_leave_the_coverage_schedule() -> None:
    clients = _fleet()
    config = SchedulerConfig(objective="progress", signal_share=(0.1, 0.2, 0.3, 0.2, 0.1, 0.15),
                             signal_sd=(0.2,) * 6)
    assert (solve_schedule(clients, BLOCKS, config).assignments
            == solve_schedule(clients, BLOCKS, PROGRESS).assignments)


@pytest.mark.parametrize("seed", range(6))
def test_random_fleets_stay_feasible_under_the_progress_objective(seed: int) -> None:
    rng = np.random.default_rng(seed)
    clients = random_clients(rng, 12, 8)
    rho = tuple(float(v) for v in rng.uniform(0, 1, 8))
    config = SchedulerConfig(objective="progress", signal_share=rho, signal_sd=(0.05,) * 8)
    schedule = solve_schedule(clients, [5] * 8, config)
    check_feasible(schedule, clients, [5] * 8, config)
    assert all(schedule.assignments.values())


def test_the_objective_is_a_scheduler_setting_and_its_estimate_is_not(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="objective"):
        SchedulerConfig(objective="speed")
    base = {"enrolment_secret": "x" * 32, "storage": {"path": str(tmp_path / "s.sqlite3")}}
    assert config_from_dict(base | {"scheduler": {"objective": "progress"}}).scheduler.objective \
        == "progress"
    with pytest.raises(ConfigError, match="signal_share"):
        config_from_dict(base | {"scheduler": {"signal_share": [0.5]}})


def test_the_engine_re_solves_each_round_with_its_signal_estimate(tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2)
    e.config = replace(e.config, scheduler=SchedulerConfig(objective="progress"))
    join(e, "a"), join(e, "b")
    first = open_next(e)
    assert first.schedule_method == "progress"
    for cid in ("a", "b"):
        count = len(first.assignment_for(cid, 0.0).pool_indices)
        e.accept_report(received(e, cid, [1.0 + 0.1 * t for t in range(count)]))
    e.apply_close(e.decide_close(now=1.0))
    solved = e.schedules_solved
    open_next(e, now=2.0)
    assert e.schedules_solved == solved + 1  # same members, solved again
    assert e.signal is not None and e.signal.rows  # both held every block: one pair row
    status = run_status(e, "run", {}, now=2.0)
    assert e.footprint is not None
    signal = status["block_signal"]
    assert signal["rows"] == 1 and len(signal["rho"]) == e.footprint.num_blocks
    assert "pairs of reports" in render(status)
