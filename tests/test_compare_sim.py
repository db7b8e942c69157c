"""The simulator comparison: its statistics on hand-made numbers, and one tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from client_support import make_world, signal_examples
from results_page import save_plots  # benchmarks/ (conftest.py)

from zorba_edge.model.sources import open_source
from zorba_lab.compare import stats
from zorba_lab.compare.page import sim_markdown, sim_plots
from zorba_lab.compare.simulator import CompareSetting, SeedData, SeedResult, figures, run_comparison
from zorba_server.config import config_from_dict
from zorba_sim.fleet import fleet_from_counts
from zorba_sim.simulation import central_mezo

P = stats.VersionPoint


def curve() -> list[stats.VersionPoint]:
    return [P(0, 0, 0.0, 0, 0.5), P(1, 1, 30.0, 40, 0.6), P(2, 2, 55.0, 90, 0.7),
            P(3, 3, 90.0, 120, 0.8)]


@pytest.mark.parametrize(("axis", "x", "version"), [
    (stats.TIME, 0.0, 0), (stats.TIME, 29.9, 0), (stats.TIME, 30.0, 1), (stats.TIME, 89.0, 2),
    (stats.TIME, 500.0, 3), (stats.FORWARDS, 39, 0), (stats.FORWARDS, 90, 2),
    (stats.FORWARDS, 119, 2), (stats.FORWARDS, 120, 3)])
def test_a_mode_holds_the_last_version_published_at_or_before_a_point(axis: str, x: float,
                                                                      version: int) -> None:
    assert stats.version_at(curve(), axis, x).version == version


def test_the_common_point_is_the_earliest_end_so_every_mode_has_a_model_there() -> None:
    short = [P(0, 0, 0.0, 0), P(1, 1, 25.0, 200)]
    assert stats.common_point([90.0, 25.0], stats.TIME) == 25.01
    assert stats.common_point([120, 200], stats.FORWARDS) == 120
    assert stats.version_at(curve(), stats.TIME, 25.01).version == 0
    assert stats.version_at(short, stats.FORWARDS, 120).version == 0
    with pytest.raises(ValueError, match="no runs"):
        stats.common_point([], stats.TIME)
    with pytest.raises(ValueError, match="unknown axis"):
        stats.common_point([1.0], "wall_s")


def test_runs_whose_last_rounds_close_a_millisecond_apart_are_scored_at_their_last_versions() -> None:
    """Session 15: a mode with shorter messages closes its last round ~0.1 ms earlier; the mode
    ending just after it must not be scored one round back."""
    first = [P(0, 0, 0.0, 0), P(1, 1, 30.0, 40), P(2, 2, 60.0, 80)]
    later = [P(0, 0, 0.0, 0), P(1, 1, 30.0001, 40), P(2, 2, 60.0001, 80)]
    x = stats.common_point([60.0, 60.0001], stats.TIME)
    assert stats.version_at(first, stats.TIME, x).version == 2
    assert stats.version_at(later, stats.TIME, x).version == 2
    # A run that ended a whole round later is still scored where the earliest run ended.
    slow = [P(0, 0, 0.0, 0), P(1, 1, 45.0, 40), P(2, 2, 90.0, 80)]
    assert stats.version_at(slow, stats.TIME, stats.common_point([60.0, 90.0], stats.TIME)).version == 1


def test_a_curve_out_of_order_is_refused() -> None:
    with pytest.raises(ValueError, match="not in order"):
        stats.version_at([P(0, 0, 0.0, 0), P(1, 1, 30.0, 50), P(2, 2, 20.0, 60)], stats.TIME, 40)
    with pytest.raises(ValueError, match="base model"):
        stats.version_at([P(1, 1, 30.0, 50)], stats.TIME, 40)


def test_accuracy_on_a_grid_steps_at_each_version() -> None:
    assert stats.accuracy_on_grid(curve(), stats.TIME, [0, 31, 60, 100]) == [0.5, 0.6, 0.7, 0.8]


def test_paired_bootstrap_interval_of_hand_made_differences() -> None:
    a = {0: 0.70, 1: 0.72, 2: 0.68, 3: 0.75, 4: 0.71}
    b = {0: 0.60, 1: 0.65, 2: 0.66, 3: 0.62, 4: 0.64, 9: 0.99}  # seed 9 has no pair: left out
    diff = stats.paired_difference(a, b)
    assert diff.per_seed == pytest.approx((0.10, 0.07, 0.02, 0.13, 0.07))
    assert diff.mean == pytest.approx(0.078)
    low, high = diff.ci90
    assert 0.02 <= low < diff.mean < high <= 0.13  # inside the range of the differences
    assert low == pytest.approx(0.048, abs=0.01) and high == pytest.approx(0.106, abs=0.01)
    assert stats.paired_difference(a, b).ci90 == diff.ci90  # seeded: the same interval again


def test_a_difference_that_changes_sign_across_seeds_has_an_interval_around_zero() -> None:
    low, high = stats.bootstrap_ci([0.05, -0.04, 0.03, -0.05, 0.01])
    assert low < 0 < high


def test_an_interval_needs_two_seeds() -> None:
    with pytest.raises(ValueError, match="more seeds"):
        stats.bootstrap_ci([0.1])


def test_each_mode_is_scored_only_where_a_reported_difference_needs_it() -> None:
    from zorba_lab.compare.simulator import scored_axes

    modes = ("zorba", "zorba-uniform", "fedzo-full", "central-mezo")
    assert scored_axes("zorba", modes) == (stats.TIME, stats.FORWARDS)
    assert scored_axes("fedzo-full", modes) == (stats.TIME,)
    assert scored_axes("central-mezo", modes) == (stats.FORWARDS,)
    assert scored_axes("fedavg", (*modes, "fedavg")) == (stats.TIME,)
    assert scored_axes("zorba-uniform", ("zorba-uniform",)) == stats.AXES  # compared with nothing


def test_gain_ratio_divides_the_mean_gains_over_the_base_model() -> None:
    base = {0: 0.5, 1: 0.6}
    assert stats.gain_ratio({0: 0.6, 1: 0.7}, {0: 0.7, 1: 0.8}, base) == pytest.approx(0.5)
    assert stats.gain_ratio({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6}, base) is None  # no reference gain


def test_a_tiny_comparison_produces_the_json_figures_page_and_plots(
        tmp_path: Path, one_thread: None) -> None:
    world = make_world(tmp_path)
    setting = CompareSetting.of(modes=("zorba", "central-mezo"), seeds=2, rounds=2, lr=1e-3,
                             batch_size=4, seq_len=16, pool_size=64, max_steps=3,
                             reference_step_s=1.0, curve_examples=16, point_examples=24,
                             frozen_dtype="bf16", eval_batch_size=8)
    lines: list[str] = []
    partials: list[list[int]] = []
    results = run_comparison(
        setting, open_source(world.model_dir), fleet_from_counts("laptop-16gb=2,phone-6gb=1"),
        lambda seed: SeedData(signal_examples(60, seed=seed), signal_examples(16, seed=100 + seed),
                              signal_examples(24, seed=200 + seed)), lines.append,
        after_seed=lambda done: partials.append([r.seed for r in done]))
    assert [r.seed for r in results] == [0, 1]
    assert partials == [[0], [0, 1]]  # a run cut short keeps the seeds it finished
    out = figures(setting, results)
    for key in ("gain_ratio_zorba_over_central_mezo", "ci90_zorba_minus_fedzo_full",
                "ci90_zorba_minus_zorba_uniform", "acc_zorba_final", "acc_central_mezo_final",
                "accuracy_at_equal_virtual_time", "accuracy_at_equal_forwards", "base_accuracy"):
        assert key in out
    assert out["ci90_zorba_minus_fedavg"] is None  # fedavg not among the modes: no figure
    # The bias floor stands beside the accuracies: each seed's, and their mean.
    assert all(r.acc_bias_floor is not None and 0 <= r.acc_bias_floor <= 1 for r in results)
    assert out["acc_bias_floor"] == pytest.approx(np.mean([r.acc_bias_floor for r in results]))
    assert stats.TIME not in out["paired_differences"]  # no pair of these two modes there
    pair = out["paired_differences"][stats.FORWARDS]["zorba - central-mezo"]
    assert len(pair["per_seed"]) == 2 and pair["ci90"][0] <= pair["ci90"][1]
    for r in results:
        zorba, central = r.runs["zorba"], r.runs["central-mezo"]
        assert zorba.applied >= 1 and central.applied >= 1
        first = min((zorba, central), key=lambda run: run.end[stats.FORWARDS])
        assert r.common[stats.FORWARDS] == first.end[stats.FORWARDS]
        assert r.common[stats.TIME] == min(run.end[stats.TIME] for run in r.runs.values()) \
                + stats.SIMULTANEOUS[stats.TIME]
        assert first.at_points[stats.FORWARDS][0] == first.curve[-1].version
        # scored on the 24 point examples (accuracies are multiples of 1/24), where compared
        assert set(zorba.at_points) == set(central.at_points) == {stats.FORWARDS}
        assert all(round(acc * 24, 6).is_integer() for _, acc in zorba.at_points.values())
    assert any("base model" in line for line in lines)
    # Resumed after seed 0 (its record through JSON, as partial.json keeps it): seed 0 is not
    # run again, seed 1 is, and the figures are the uninterrupted run's.
    kept = SeedResult.from_dict(json.loads(json.dumps(results[0].as_dict())))
    resumed_lines: list[str] = []
    resumed = run_comparison(
        setting, open_source(world.model_dir), fleet_from_counts("laptop-16gb=2,phone-6gb=1"),
        lambda seed: SeedData(signal_examples(60, seed=seed), signal_examples(16, seed=100 + seed),
                              signal_examples(24, seed=200 + seed)), resumed_lines.append,
        done=[kept])
    assert [r.seed for r in resumed] == [0, 1]
    assert not any("[seed 0" in line for line in resumed_lines)
    assert any("[seed 1" in line for line in resumed_lines)
    assert figures(setting, resumed) == out
    plots = save_plots(sim_plots(setting, results), tmp_path / "results.md")  # as the benchmark
    header = {"command": "test", "machine": "x", "date": "d", "setting": {"seeds": 2}}
    text = sim_markdown(setting, results, out, header, plots, tmp_path / "results.md")
    assert "fedavg was not among this run's modes" in text and "bootstrap" in text
    assert all(p.exists() for p in plots.values())


def test_a_version_scored_after_rewinding_equals_the_model_trained_to_it(
        tmp_path: Path, one_thread: None) -> None:
    """Moving the model back along the coefficient table reproduces the version's accuracy."""
    from zorba_edge.engine.losses import evaluate_classification
    from zorba_lab.compare.simulator import _batches, train_mode

    world = make_world(tmp_path)
    setting = CompareSetting.of(modes=("zorba",), seeds=1, rounds=3, lr=3e-2, batch_size=4,
                             seq_len=16, pool_size=64, max_steps=3, reference_step_s=1.0,
                             frozen_dtype="bf16", eval_batch_size=8)
    from zorba_sim.simulation import Simulation

    points = signal_examples(40, seed=5)
    sims = []
    for rounds in (1, 3):
        sims.append(Simulation.build(
            dataclasses.replace(setting, rounds=rounds).simulation_config("zorba", 0),
            open_source(world.model_dir), fleet_from_counts("laptop-16gb=2"),
            signal_examples(60), signal_examples(8, seed=1), eval_batch_size=8))
    one, three = sims
    _, tables_one = train_mode(setting, one, 0.5, lambda _line: None)
    _, tables = train_mode(setting, three, 0.5, lambda _line: None)
    before = evaluate_classification(three.loaded.model, _batches(three, points, 8)).loss
    three.move_to_version_(tables[3], tables[1])
    rewound = evaluate_classification(three.loaded.model, _batches(three, points, 8)).loss
    trained = evaluate_classification(one.loaded.model, _batches(one, points, 8)).loss
    assert rewound == pytest.approx(trained, rel=1e-4)
    assert before != pytest.approx(trained, rel=1e-4)  # the rounds after version 1 moved it


def test_central_mezo_has_all_the_data_every_block_and_the_fleets_compute() -> None:
    fleet = fleet_from_counts("laptop-16gb=2,phone-6gb=1")
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {"max_steps": 8}})
    central, central_server = central_mezo(fleet, server)
    (device, _), = central.devices()
    assert device.speed == pytest.approx(sum(d.speed for d, _ in fleet.devices()))
    assert device.availability == 1.0 and device.dropout == 0.0
    assert central_server.run.max_steps == 8 * 3 and central_server.run.mode == "fedzo-full"
    assert server.run.max_steps == 8  # the federation's own config is untouched


def test_fedavg_is_compared_with_zorba_at_equal_virtual_time(tmp_path: Path, one_thread: None) -> None:
    from zorba_edge.client.modes.fedavg_training import FORWARDS_PER_STEP

    world = make_world(tmp_path)
    setting = CompareSetting.of(modes=("zorba", "fedavg"), seeds=2, rounds=2, lr=1e-3,
                             fedavg_lr=1e-3, batch_size=4, seq_len=16, pool_size=64, max_steps=3,
                             curve_examples=16, point_examples=24, frozen_dtype="bf16",
                             eval_batch_size=8)
    # A first-order step is three forwards' time; a one-sided ZO scalar (4 directions) 5/4.
    forward_s = setting.step_s / setting.forwards_per_scalar
    assert setting.step_s_of("fedavg") == pytest.approx(FORWARDS_PER_STEP * forward_s)
    assert setting.simulation_config("fedavg", 0).server.run.lr == 1e-3
    summed = CompareSetting.of(aggregation="sum").simulation_config("zorba", 0)
    assert summed.server.aggregation.method == "sum"
    assert CompareSetting.of(modes=("fedavg",), fedavg_step_s=7.0).step_s_of("fedavg") == 7.0
    with pytest.raises(ValueError, match="fedavg_step_s must be positive"):
        CompareSetting.of(fedavg_step_s=0.0)
    results = run_comparison(
        setting, open_source(world.model_dir), fleet_from_counts("laptop-16gb=2,phone-6gb=1"),
        lambda seed: SeedData(signal_examples(60, seed=seed), signal_examples(16, seed=100 + seed),
                              signal_examples(24, seed=200 + seed)), lambda _line: None)
    out = figures(setting, results)
    low, high = out["ci90_zorba_minus_fedavg"]
    assert low <= high
    pair = out["paired_differences"][stats.TIME]["zorba - fedavg"]
    assert len(pair["per_seed"]) == 2
    for r in results:
        fedavg = r.runs["fedavg"]
        assert fedavg.applied >= 1 and set(fedavg.at_points) == {stats.TIME}
        assert fedavg.end[stats.FORWARDS] % FORWARDS_PER_STEP == 0


def test_a_fedavg_version_scored_after_rewinding_is_the_model_trained_to_it(
        tmp_path: Path, one_thread: None) -> None:
    """fedavg keeps each version's weights: going back installs them exactly."""
    from zorba_edge.engine.losses import evaluate_classification
    from zorba_lab.compare.simulator import _batches, train_mode
    from zorba_sim.simulation import Simulation

    world = make_world(tmp_path)
    setting = CompareSetting.of(modes=("fedavg",), seeds=1, rounds=3, fedavg_lr=3e-3, batch_size=4,
                             seq_len=16, pool_size=64, max_steps=3, reference_step_s=1.0,
                             frozen_dtype="bf16", eval_batch_size=8)
    points = signal_examples(40, seed=5)
    sims = [Simulation.build(
        dataclasses.replace(setting, rounds=rounds).simulation_config("fedavg", 0),
        open_source(world.model_dir), fleet_from_counts("laptop-16gb=2"), signal_examples(60),
        signal_examples(8, seed=1), eval_batch_size=8) for rounds in (1, 3)]
    one, three = sims
    train_mode(setting, one, 0.5, lambda _line: None)
    _, kept = train_mode(setting, three, 0.5, lambda _line: None)
    assert sorted(kept) == [0, 1, 2, 3]
    before = evaluate_classification(three.loaded.model, _batches(three, points, 8)).loss
    three.move_to_version_(kept[3], kept[1])
    rewound = evaluate_classification(three.loaded.model, _batches(three, points, 8)).loss
    trained = evaluate_classification(one.loaded.model, _batches(one, points, 8)).loss
    assert rewound == trained
    assert before != trained  # the rounds after version 1 moved it
