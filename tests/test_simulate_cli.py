"""`zorba-simulate`: the results folder, resume after SIGKILL, dropout and stragglers, and fleet
errors that name the file's line (before any weights are loaded)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from client_support import CHILD_ENV, REPO, TinyWorld, make_world, signal_examples, write_jsonl

from zorba_common.run_defaults import CENTRAL_MEZO, SIM_MODES
from zorba_edge.model.sources import open_source
from zorba_server.config import AggregationConfig, config_from_dict
from zorba_sim import cli, simulation
from zorba_sim.fleet import CATALOGUE, GIB, DeviceClass, DeviceGroup, Fleet
from zorba_sim.simulation import Simulation, SimulationConfig


@pytest.fixture
def world(tmp_path: Path) -> TinyWorld:
    world = make_world(tmp_path)
    return TinyWorld(world.model_dir, write_jsonl(tmp_path / "data.jsonl", signal_examples(200)))


def tiny_args(world: TinyWorld, out: Path, *extra: str) -> list[str]:
    return ["--model", str(world.model_dir), "--data", str(world.data), "--batch-size", "4",
            "--seq-len", "16", "--pool-size", "64", "--lr", "1e-3", "--eval-examples", "16",
            "--reference-step-s", "0.5", "--round-duration", "30", "--out", str(out),
            "--log-lines", *extra]


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ------------------------------------------------------------------ the results folder


def test_a_run_writes_its_summary_rounds_plots_and_checkpoint(
        world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(tiny_args(world, out, "--rounds", "3", "--fleet", "laptop-16gb=2,phone-6gb=2",
                              "--eval-every", "1")) == 0
    summary = summary_of(out)
    assert summary["rounds_run"] == 3 and len(summary["rounds"]) == 3
    assert summary["mode"] == summary["settings"]["run"]["mode"] == "zorba"
    assert summary["reference_step_s"] == 0.5
    assert summary["fleet"]["devices"] == 4
    assert {c["name"]: c["count"] for c in summary["fleet"]["classes"]} == {"laptop-16gb": 2,
                                                                           "phone-6gb": 2}
    assert summary["forwards"] == summary["rounds"][-1]["forwards"] > 0
    assert summary["virtual_time_s"] == summary["rounds"][-1]["virtual_time_s"] > 0
    assert len(summary["alpha_hash"]) == 64
    assert len(summary["block_signal"]["rho"]) == len(summary["block_energy"])
    assert summary["final_accuracy"] == summary["rounds"][-1]["accuracy"] is not None
    assert 0.0 <= summary["base_accuracy"] <= 1.0
    # The bias floor stands beside every accuracy: in base.json, the summary and each row.
    floor = summary["acc_bias_floor"]
    assert 0.0 <= floor <= 1.0
    assert json.loads((out / "base.json").read_text())["acc_bias_floor"] == floor
    with (out / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert {float(r["acc_bias_floor"]) for r in rows} == {floor}
    assert (out / "checkpoint" / "LATEST").read_text() == "round-000003"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in summary["plots"]
    else:
        assert sorted(summary["plots"]) == ["accuracy_forwards.png", "accuracy_time.png"]
        assert (out / "accuracy_time.png").stat().st_size > 0
    lines = capsys.readouterr().err.splitlines()
    assert sum(" round " in line and "/3 " in line for line in lines) == 3


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_alpha(
        world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ("--rounds", "4", "--fleet", "laptop-16gb=2,phone-6gb=1")
    whole = tmp_path / "whole"
    assert cli.main(tiny_args(world, whole, *common)) == 0
    cut = tmp_path / "cut"
    child = subprocess.Popen([sys.executable, "-m", "zorba_sim.cli", *tiny_args(world, cut, *common)],
                             cwd=REPO, env=os.environ | CHILD_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        latest = cut / "checkpoint" / "LATEST"
        deadline = time.monotonic() + 120

        def checkpointed() -> int:
            text = latest.read_text() if latest.exists() else ""
            return int(text.removeprefix("round-")) if text.startswith("round-") else 0

        # Killed at its first checkpoint from round 2 on: on a busy machine this process may
        # look only after round 3's checkpoint, so the rounds to resume follow from the one
        # seen (an event), not from a guess at how fast the child runs.
        while checkpointed() < 2:
            assert child.poll() is None and time.monotonic() < deadline, "no checkpoint of round 2"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
        killed_after = checkpointed()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert summary_of(cut)["rounds_run"] < 4 and killed_after < 4
    capsys.readouterr()
    assert cli.main(["--resume", str(cut), "--log-lines"]) == 0
    # Continued, not restarted (a restart would reach the same alpha too): only the rounds
    # after the checkpoint ran.
    ran = re.findall(r" round +(\d+)/4 ", capsys.readouterr().err)
    assert ran == [str(r) for r in range(killed_after + 1, 5)]
    resumed, uninterrupted = summary_of(cut), summary_of(whole)
    assert resumed["rounds_run"] == 4
    assert resumed["alpha_hash"] == uninterrupted["alpha_hash"]
    assert resumed["forwards"] == uninterrupted["forwards"]
    assert resumed["rounds"][-1]["accuracy"] == uninterrupted["rounds"][-1]["accuracy"]
    assert resumed["base_accuracy"] == uninterrupted["base_accuracy"] is not None


def test_a_finished_run_started_with_relative_paths_extends_from_another_directory(
        world: TinyWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    args = tiny_args(world, Path("run"), "--rounds", "2", "--fleet", "laptop-16gb=1")
    args[args.index("--model") + 1] = world.model_dir.name  # relative to tmp_path
    args[args.index("--data") + 1] = world.data.name
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert saved["model"] == str(world.model_dir.resolve()) and saved["data"] == str(world.data.resolve())
    base = json.loads((tmp_path / "run" / "base.json").read_text())
    assert set(base) == {"accuracy", "loss", "acc_bias_floor"}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["--resume", str(tmp_path / "run"), "--rounds", "3", "--log-lines"]) == 0
    assert re.findall(r" round +(\d+)/3 ", capsys.readouterr().err) == ["3"]
    assert summary_of(tmp_path / "run")["rounds_run"] == 3
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["rounds"] == 3
    assert cli.main(["--resume", str(tmp_path / "run"), "--rounds", "2"]) == 2
    assert "has 3 rounds already" in capsys.readouterr().err


def test_the_accuracy_band_is_the_wilson_interval() -> None:
    from zorba_sim.results import wilson_interval

    low, high = wilson_interval(0.7, 100)
    assert low == pytest.approx(0.6041, abs=1e-4) and high == pytest.approx(0.7810, abs=1e-4)
    assert wilson_interval(1.0, 16)[1] == 1.0 and wilson_interval(0.0, 16)[0] == 0.0
    narrow, wide = wilson_interval(0.7, 10_000), wilson_interval(0.7, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_an_out_folder_holding_a_run_is_not_overwritten(
        world: TinyWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(tiny_args(world, out, "--rounds", "1", "--fleet", "laptop-16gb=1")) == 0
    capsys.readouterr()
    assert cli.main(tiny_args(world, out, "--rounds", "1", "--fleet", "laptop-16gb=1")) == 2
    assert f"--resume {out}" in capsys.readouterr().err


# ------------------------------------------------------------------ dropout and stragglers


def simulate(root: Path, device: DeviceClass, count: int = 2, **run: object) -> Simulation:
    world = make_world(root)
    server = config_from_dict({"enrolment_secret": "s" * 16, "run": {
        "pool_size": 64, "lr": 1e-3, "mu": 1e-3, "batch_size": 4, "seq_len": 16,
        "round_duration_s": 30, "max_steps": 8, "seed": 1} | run})
    config = SimulationConfig(server, rounds=2, reference_step_s=1.0)
    sim = Simulation.build(config, open_source(world.model_dir),
                           Fleet((DeviceGroup(device, count, 0),)), signal_examples(60),
                           signal_examples(8, seed=1))
    sim.run()
    return sim


def device(name: str, **fields: float) -> DeviceClass:
    base = {"memory_budget_bytes": 4 * GIB, "speed": 1.0, "upload_mbps": 100.0,
            "download_mbps": 100.0, "availability": 1.0, "dropout": 0.0}
    return DeviceClass(name, **(base | fields))  # type: ignore[arg-type]


def test_devices_that_drop_out_report_nothing_and_nothing_is_applied(tmp_path: Path) -> None:
    # Each draw reports with probability 0.01; the draws are a pure function of the seeds, and
    # with run seed 2 every one of the six (3 devices x 2 rounds) drops.
    sim = simulate(tmp_path, device("flaky", dropout=0.99), count=3, seed=2)
    for record in sim.records:
        assert record.assigned == 3 and record.dropped == 3 and record.reports == 0
        assert record.status != "applied"
    assert sim.engine.version == 0
    assert sim.engine.alpha is not None and not sim.engine.alpha.any()


def test_a_device_on_a_slow_link_reports_fewer_steps_than_planned(tmp_path: Path) -> None:
    # The plan gives the 1 s steps 80% of the 30 s round (8 steps, the max); at 160 bit/s the
    # download and the report's upload take ~22 s of it, so only a few steps fit the deadline.
    # One direction a batch: a batch of 4 would not fit at all (a device starts whole batches).
    slow = device("slow-link", upload_mbps=0.00016, download_mbps=0.00016)
    sim = simulate(tmp_path, slow, count=1, estimator="antithetic", directions=1)
    record = sim.records[0]
    assert sim.engine.history[0].round == 1
    planned = sim.engine.last_plan.clients["v000000"].num_steps if sim.engine.last_plan else 0
    taken = (record.forwards - 1) // 2  # the check batch's forward, then two a step
    assert planned == 8 and 0 < taken < planned
    assert record.status == "applied" and record.reports == 1 and record.stragglers == 1
    assert record.virtual_time_s <= 30.0


def test_a_device_too_slow_for_one_step_is_left_out_by_the_scheduler(tmp_path: Path) -> None:
    # The plan sizes steps from each device's step time: a 10 s step cannot hold
    # min_steps=4 in the 24 s compute share, so the device is not assigned at all.
    sim = simulate(tmp_path, device("slow", speed=0.1), count=1, min_steps=4)
    assert [r.status for r in sim.records] == ["idle", "idle"]
    assert "leaves no room for min_steps=4" in sim.engine.idle_reason


# ------------------------------------------------------------------ fleet errors


def fleet_error(tmp_path: Path, world: TinyWorld, text: str, capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> str:
    """The one error line for a fleet file; loading weights would fail the test."""
    def no_weights(*_: object, **__: object) -> None:
        raise AssertionError("model weights were loaded before the fleet was checked")

    monkeypatch.setattr(simulation, "load_model", no_weights)
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    code = cli.main(tiny_args(world, tmp_path / "out", "--fleet-file", str(path)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("zorba-simulate: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    return err


LAPTOP = '[[device]]\nclass = "laptop-16gb"\ncount = 2\n\n'


@pytest.mark.parametrize(("table", "says"), [
    ('[[device]]\nclass = "toaster"\n', "unknown device class 'toaster'"),
    ('[[device]]\nclass = "pi4-4gb"\nmemory_budget = -1\n', "must be positive"),
    ('[[device]]\nclass = "pi4-4gb"\nmemory_budget = "-1GiB"\n', "is not a size"),
    ('[[device]]\nclass = "pi4-4gb"\ncount = 0\n', "count = 0"),
    ('[[device]]\nclass = "phone-6gb"\nmemory_budget = "1MiB"\n', "raise its memory_budget"),
])
def test_a_bad_device_table_is_named_by_its_line(
        tmp_path: Path, world: TinyWorld, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, table: str, says: str) -> None:
    err = fleet_error(tmp_path, world, LAPTOP + table, capsys, monkeypatch)
    assert "fleet.toml line 5: " in err and says in err


def test_a_fleet_file_without_devices_is_refused(
        tmp_path: Path, world: TinyWorld, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    err = fleet_error(tmp_path, world, "# no devices\n", capsys, monkeypatch)
    assert "no [[device]] table" in err


# ------------------------------------------------------------------ the command line


def test_the_help_explains_every_flag_and_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    p = cli.parser()
    assert all(a.help for a in p._actions)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for device_class in CATALOGUE.values():
        assert device_class.name in text and " ".join(device_class.source.split()) in text


def test_the_command_offers_every_simulator_mode() -> None:
    mode = next(a for a in cli.parser()._actions if a.dest == "mode")
    assert tuple(mode.choices) == SIM_MODES


def test_central_mezo_is_the_simulators_own_mode_beside_the_run_config() -> None:
    settings = cli.settings_from_args(cli.parser().parse_args(["--mode", "central-mezo"]))
    assert settings.central and settings.mode == CENTRAL_MEZO
    assert settings.run == cli.SIM_RUN  # the server's run config, not a copy of its fields
    assert cli.simulation_config(settings, "cpu").mode == CENTRAL_MEZO


def test_saved_settings_resume_as_they_were_started(tmp_path: Path) -> None:
    settings = cli.settings_from_args(cli.parser().parse_args(
        ["--mode", "fedzo-full", "--lr", "3e-4", "--aggregation", "median", "--rounds", "2"]))
    (tmp_path / cli.SETTINGS).write_text(json.dumps(dataclasses.asdict(settings)))
    assert cli.load_settings(tmp_path) == settings
    # A settings file of the flat layout, from before the simulator held the run config.
    flat = {"mode": "central-mezo", "lr": 3e-4, "aggregation": "median", "seq_len": 48,
            "max_steps": 4, "rounds": 2}
    (tmp_path / cli.SETTINGS).write_text(json.dumps(flat))
    old = cli.load_settings(tmp_path)
    assert old.central and old.run.lr == 3e-4 and old.aggregation.method == "median"
    assert old.run.trust_radius == 0.0 and old.run.plateau_rounds == 0  # as it was run then


def test_the_aggregation_flag_reaches_the_engine() -> None:
    args = cli.parser().parse_args(["--aggregation", "sum"])
    config = cli.simulation_config(cli.settings_from_args(args), "cpu")
    assert config.server.aggregation.method == "sum"
    default = cli.simulation_config(cli.settings_from_args(cli.parser().parse_args([])), "cpu")
    assert default.server.aggregation.method == AggregationConfig().method


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs launched together used to share runs/sim-<second> and overwrite each other's
    checkpoint; the folder is now made exclusively, a suffix where the name is taken."""
    from zorba_common.run_dirs import new_run_dir

    monkeypatch.setattr("time.strftime", lambda _fmt: "20261207-132503")
    first, second, third = (new_run_dir("sim", tmp_path) for _ in range(3))
    assert [p.name for p in (first, second, third)] == [
        "sim-20261207-132503", "sim-20261207-132503-2", "sim-20261207-132503-3"]
    assert all(p.is_dir() for p in (first, second, third))
