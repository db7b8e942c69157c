"""The comparison's pure parts: equal-wall-time pick, ratios, targets and the results page."""

from __future__ import annotations

from pathlib import Path

import pytest
from results_page import save_plots  # benchmarks/ (conftest.py)

from zorba_lab.compare.processes_report import (
    AccuracyPoint,
    ClientResult,
    ModeRun,
    Page,
    accuracy_at_time,
    equal_wall_time,
    headline,
    markdown,
    summarize,
)
from zorba_lab.compare.processes_report import plots as report_plots

GIB = 2**30


def points(*rows: tuple[float, float]) -> tuple[AccuracyPoint, ...]:
    """(wall_s, accuracy) per version 1, 2, ...; the base model (0.5) first."""
    base = AccuracyPoint(0, 0, 0.0, 0.5, 0.7)
    return (base, *(AccuracyPoint(v, v, t, acc, 0.6) for v, (t, acc) in enumerate(rows, start=1)))


def client(name: str, peak_gib: float, up: float, down: float, *, budget_gib: float = 1.0,
           excluded: str | None = None) -> ClientResult:
    return ClientResult(name, int(budget_gib * GIB), int(peak_gib * GIB),
                        0 if excluded else 3, up, down, (4,), excluded)


def run(mode: str, rep: int, pts: tuple[AccuracyPoint, ...], clients: tuple[ClientResult, ...] = (),
        train_s: float | None = None) -> ModeRun:
    applied = len(pts) - 1
    return ModeRun(mode, rep, pts, clients or (client("c0", 0.5, 100, 200),),
                   pts[-1].wall_s if train_s is None else train_s, 10 * applied, applied)


def test_equal_wall_time_takes_each_modes_last_version_closed_by_the_fastest_mode() -> None:
    fast = run("zorba", 0, points((30, 0.6), (60, 0.7), (100, 0.8)))
    slow = run("fedavg", 0, points((70, 0.55), (140, 0.9), (200, 0.95)))
    assert equal_wall_time([fast, slow]) == 100
    assert accuracy_at_time(slow.points, 100).version == 1
    assert accuracy_at_time(slow.points, 69.9).version == 0  # nothing closed yet: the base
    summaries = summarize([fast, slow])
    assert summaries["zorba"].acc_equal_time.mean == 0.8
    assert summaries["fedavg"].acc_equal_time.mean == 0.55
    # At equal rounds (3 each) fedavg is ahead: the two picks differ.
    assert summaries["fedavg"].acc_equal_rounds.mean == 0.95


def test_an_unevaluated_version_falls_back_to_the_last_evaluated_one() -> None:
    # eval_every=2: versions 1 and 3 were not evaluated; version 3 closed at T but is absent.
    sparse = (AccuracyPoint(0, 0, 0.0, 0.5, 0.7), AccuracyPoint(2, 2, 50.0, 0.65, 0.6),
              AccuracyPoint(4, 4, 120.0, 0.75, 0.5))
    fast = run("zorba", 0, points((30, 0.6), (90, 0.7)))
    summaries = summarize([fast, run("fedzo-full", 0, sparse)])
    assert summaries["fedzo-full"].equal_time_s == (90.0,)
    assert summaries["fedzo-full"].acc_equal_time.mean == 0.65


def test_a_run_that_applied_nothing_does_not_drag_equal_time_to_zero() -> None:
    dead = run("zorba-uniform", 0, points(), train_s=0.0)
    live = run("zorba", 0, points((40, 0.6), (80, 0.7)))
    assert equal_wall_time([dead, live]) == 80
    assert summarize([dead, live])["zorba-uniform"].acc_equal_time.mean == 0.5


def test_repetitions_pick_at_their_own_equal_time_then_average_with_spread() -> None:
    runs = [run("zorba", 0, points((50, 0.6), (100, 0.7))),
            run("fedavg", 0, points((80, 0.9), (160, 0.95))),
            run("zorba", 1, points((60, 0.62), (120, 0.8))),
            run("fedavg", 1, points((50, 0.7), (130, 0.85)))]
    s = summarize(runs)
    # rep 0: T = 100 -> fedavg v1 (0.9); rep 1: T = 120 -> fedavg v1 (0.7).
    assert s["fedavg"].equal_time_s == (100.0, 120.0)
    assert s["fedavg"].acc_equal_time.mean == pytest.approx(0.8)
    assert (s["fedavg"].acc_equal_time.min, s["fedavg"].acc_equal_time.max) == (0.7, 0.9)
    assert s["fedavg"].acc_equal_time.std == pytest.approx(0.1414213, rel=1e-5)
    assert s["zorba"].acc_equal_time.mean == pytest.approx(0.75)


def test_ratios_are_null_without_fedavg_and_computed_from_peaks_and_bytes_with_it() -> None:
    zo_clients = (client("c0", 0.6, 100, 300), client("c1", 0.9, 300, 500),
                  client("c2", 0.0, 0, 0, excluded="cannot hold every block"))
    zorba = run("zorba", 0, points((50, 0.7)), zo_clients)
    uniform = run("zorba-uniform", 0, points((50, 0.6)))
    without = headline(summarize([zorba, uniform]))
    assert without["peak_ratio_zorba_over_fedavg"] is None
    assert without["bytes_ratio_zorba_over_fedavg"] is None
    assert without["acc_fedavg"] is None and without["acc_fedzo_full"] is None
    met = without["targets_met"]
    assert met["peak_ratio<=0.4"] is None and met["bytes_ratio<=0.0001"] is None
    assert met["acc_zorba>=acc_fedzo_full"] is None
    assert met["acc_zorba>=acc_zorba_uniform"] is True

    fedavg = run("fedavg", 0, points((50, 0.8)),
                 (client("c0", 2.0, 5e8, 5e8), client("c1", 3.0, 7e8, 7e8)))
    full = headline(summarize([zorba, uniform, fedavg]))
    assert full["peak_ratio_zorba_over_fedavg"] == pytest.approx(0.9 / 3.0)
    # The excluded client's zero bytes are not averaged in: zorba moves (200+400) B a round.
    assert full["bytes_ratio_zorba_over_fedavg"] == pytest.approx(600 / 1.2e9)
    assert full["targets_met"] == {"peak_ratio<=0.4": True, "bytes_ratio<=0.0001": True,
                                   "acc_zorba>=acc_fedzo_full": None,
                                   "acc_zorba>=acc_zorba_uniform": True}
    assert full["acc_fedavg"] == 0.8 and full["acc_zorba_at_equal_rounds"] == 0.7


def four_modes() -> list[ModeRun]:
    return [run("zorba", 0, points((50, 0.61), (100, 0.71))),
            run("zorba-uniform", 0, points((50, 0.62), (100, 0.72))),
            run("fedzo-full", 0, points((50, 0.63), (100, 0.73)),
                (client("c0", 0.9, 90, 190),
                 client("c1", 0.0, 0, 0, excluded="needs 1.4 GiB for every block"))),
            run("fedavg", 0, points((80, 0.64), (160, 0.74)), (client("c0", 2.5, 4e8, 4e8),))]


def test_the_page_has_a_row_per_mode_the_exclusions_and_the_per_round_table(tmp_path: Path) -> None:
    page = Page({"kind": "quick", "rounds": 2}, "python benchmarks/compare.py --quick", "x86",
                "2025-01-01")
    text = markdown(four_modes(), page, tmp_path / "results.md")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for mode in ("zorba", "zorba-uniform", "fedzo-full", "fedavg"):
        assert any(line.startswith(f"| {mode} | ") for line in rows), mode
    assert "c1 (needs 1.4 GiB for every block)" in text
    assert "**quick**" in text and "python benchmarks/compare.py --quick" in text
    assert "not tuned" in text
    # Per round: the base and both versions, each mode's accuracy with its close time.
    assert "| base | 0.5000 (0) | 0.5000 (0) | 0.5000 (0) | 0.5000 (0) |" in rows
    assert "| 2 | 0.7100 (100) | 0.7200 (100) | 0.7300 (100) | 0.7400 (160) |" in rows


def test_plots_land_beside_the_page_and_are_embedded(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "results.md"
    plots = save_plots(report_plots(four_modes()), path)  # what the benchmark does
    assert sorted(p.name for p in plots.values()) == [
        "results_accuracy_rounds.png", "results_accuracy_time.png", "results_peaks.png"]
    assert all(p.stat().st_size > 1000 for p in plots.values())
    text = markdown(four_modes(), Page({}, "cmd", "x86", "d", plots=plots), path)
    assert "](results_peaks.png)" in text


def test_runs_read_back_from_json_give_the_same_page(tmp_path: Path) -> None:
    import json

    runs = four_modes()
    back = [ModeRun.from_dict(json.loads(json.dumps(r.as_dict()))) for r in runs]
    assert back == runs
    page = Page({"kind": "full"}, "cmd", "x86", "d")
    assert markdown(back, page, tmp_path / "r.md") == markdown(runs, page, tmp_path / "r.md")
