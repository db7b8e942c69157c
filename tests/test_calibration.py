"""The memory calibration rule on hand-made members and reports (no HTTP, no database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_fakes import engine, join, open_next, received

from zorba_server import calibration
from zorba_server.calibration import CALIBRATION_MAX, CALIBRATION_MIN
from zorba_server.rounds import RoundPlan


def measured_after(tmp_path: Path, before: float, peak_over_predicted: float) -> float:
    e = engine(tmp_path)
    a = join(e, "a")
    a.calibration = before
    plan = open_next(e)
    predicted = e.memory_model(a.profile, 1.0).total(plan.clients["a"].blocks)
    report = received(e, "a", peak=int(predicted * peak_over_predicted))
    return calibration.measured(e.config.run, e.members, plan, {"a": report})["a"]


def test_an_under_estimate_is_taken_at_once_and_an_over_estimate_decays(tmp_path: Path) -> None:
    assert measured_after(tmp_path, 1.0, 1.5) == pytest.approx(1.5)
    assert measured_after(tmp_path, 2.0, 1.0) == pytest.approx(1.5)  # (2 + 1) / 2


def test_a_measured_calibration_stays_within_its_band(tmp_path: Path) -> None:
    assert measured_after(tmp_path, 1.0, 100.0) == CALIBRATION_MAX
    assert measured_after(tmp_path, CALIBRATION_MIN, 0.01) == CALIBRATION_MIN


def test_a_report_without_a_peak_leaves_the_calibration_alone(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a")
    plan = open_next(e)
    assert calibration.measured(e.config.run, e.members, plan, {"a": received(e, "a")}) == {}


def test_members_left_out_drift_halfway_back_to_the_model_then_snap_to_it(tmp_path: Path) -> None:
    e = engine(tmp_path)
    for name, value in (("far", 3.0), ("near", 1.15), ("under", 0.8)):
        join(e, name).calibration = value
    nobody = RoundPlan(1, 0, 0.0, 60.0, e.hyper(), (0,), {})
    # 3 -> 2; 1.15 -> 1.075, within one re-solve band of 1 -> 1; below 1 is not decayed.
    assert calibration.decayed(e.members, nobody) == {"far": 2.0, "near": 1.0}


def test_the_schedule_is_re_solved_only_when_a_calibration_changes_band() -> None:
    assert calibration.band(1.0) == calibration.band(1.04) != calibration.band(1.1)
