"""The run modes' registry: it covers the wire's RUN_MODES exactly, the config and the CLI offer
what it lists, and the engine plans a round from the mode object alone (no branch on its name)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
from server_fakes import FINGERPRINT, FOOTPRINT, config_dict, profile

from zorba_common.run_defaults import RUN_MODES
from zorba_server.cli import parse_args
from zorba_server.config import ConfigError, RunConfig, config_from_dict
from zorba_server.engine import RoundEngine
from zorba_server.errors import Unprocessable
from zorba_server.members import Member
from zorba_server.modes import MODES, RunMode
from zorba_server.scheduler import ClientSpec, Schedule, SchedulerConfig
from zorba_server.scheduler_baselines import full_schedule, solve_schedule


def test_the_registry_covers_the_wires_run_modes_exactly() -> None:
    assert tuple(MODES) == RUN_MODES
    assert all(name == mode.name and callable(mode.solve) for name, mode in MODES.items())
    assert RunConfig().mode == next(iter(MODES))  # the default first


def test_the_config_and_the_cli_offer_exactly_the_registered_modes(
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in MODES:
        assert RunConfig(mode=name).mode == name
        assert parse_args(["--mode", name]).mode == name
    with pytest.raises(ConfigError, match="run.mode='full': use one of zorba, zorba-uniform, "
                                          "fedzo-full, fedavg"):
        RunConfig(mode="full")
    with pytest.raises(SystemExit):
        parse_args(["--mode", "full"])
    assert "invalid choice: 'full'" in capsys.readouterr().err


def test_what_each_mode_declares() -> None:
    """What used to be `if mode == ...` across the server, as data."""
    declared = {name: (m.redraws_each_round, m.weights_only, m.enforces_budget)
                for name, m in MODES.items()}
    assert declared == {"zorba": (False, False, True), "zorba-uniform": (True, False, True),
                        "fedzo-full": (False, False, True), "fedavg": (False, True, False)}
    assert MODES["zorba"].solve is solve_schedule and MODES["fedzo-full"].solve is full_schedule


def engine(tmp_path: Path, mode: str) -> RoundEngine:
    made = RoundEngine(config_from_dict(config_dict(tmp_path / "unused.sqlite3", mode=mode,
                                                    min_clients=1)))
    made.pin(FINGERPRINT, FOOTPRINT)
    return made


def test_a_mode_that_keeps_no_budget_admits_a_device_that_holds_no_block(tmp_path: Path) -> None:
    tiny = profile(budget=1000, name="tiny")
    with pytest.raises(Unprocessable, match="cheapest block"):
        engine(tmp_path, "zorba").check_registration(tiny)
    fedavg = engine(tmp_path, "fedavg")
    fedavg.check_registration(tiny)
    assert fedavg.weights_only


def test_a_mode_registered_in_one_entry_is_what_the_engine_plans_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def first_block(clients: Sequence[ClientSpec], block_params: Sequence[int],
                    config: SchedulerConfig, round_seed: int) -> Schedule:
        calls.append(round_seed)
        schedule = full_schedule(clients, block_params, config, round_seed)
        return dataclasses.replace(schedule, assignments={c: (0,) for c in schedule.assignments})

    monkeypatch.setitem(MODES, "first-block", RunMode("first-block", "block 0 everywhere",
                                                      first_block, redraws_each_round=True))
    e = engine(tmp_path, "first-block")
    p = profile(name="a")
    e.check_registration(p)
    e.add_member(Member("a", p, 0.0, 1.0, 0.0, p.step_time_s))
    first = e.propose_round(now=0.0)
    assert first is not None and first.clients["a"].blocks == (0,)
    e.open_round(first)
    e.open = None  # drop the round unreported: the next one is planned afresh
    assert e.propose_round(now=1.0) is not None
    assert len(calls) == 2 and calls[0] != calls[1]  # redrawn, with each round's own seed
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="run.mode='first-block'"):
        RunConfig(mode="first-block")
