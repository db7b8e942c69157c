"""The simulator benchmark's round split (benchmarks/simulate.py): its phases add up to the
round, whatever was timed inside it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def benchmark() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "simulate.py"
    spec = importlib.util.spec_from_file_location("simulate_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_round_split_puts_the_untimed_loop_time_and_the_rest_of_the_round_in_their_own_phases() -> None:
    bench = benchmark()
    seconds = {"local_loop": 10.0, "zo_steps": 7.0, "batches": 0.5, "check_forward": 1.0,
               "snapshot": 0.25, "revert": 0.25, "sync": 2.0}
    split = bench.round_split(seconds, 12.5)
    assert list(split) == list(bench.PHASES)
    assert split["release_memory"] == 0.0  # not timed: not called
    assert split["loop_other"] == pytest.approx(1.0)  # 10 - (7 + 0.5 + 1 + 0.25 + 0.25)
    assert split["rest"] == pytest.approx(0.5)  # 12.5 - 10 - 2
    assert sum(split.values()) == pytest.approx(12.5)


def test_phase_clock_times_a_loss_only_outside_the_steps_and_undoes_its_patches() -> None:
    bench = benchmark()
    clock = bench.PhaseClock()
    calls: list[str] = []

    def loss() -> None:
        calls.append("loss")

    timed_loss = clock.timed("check_forward", loss, unless_inside="zo_steps")
    steps = clock.timed("zo_steps", lambda: timed_loss())
    steps()
    assert set(clock.seconds) == {"zo_steps"}  # the loss inside a step is the step's
    timed_loss()
    assert set(clock.take()) == {"zo_steps", "check_forward"}
    assert clock.seconds == {} and calls == ["loss", "loss"]

    class Owner:
        def work(self) -> int:
            return 3

    clock.patch(Owner, "work", "sync")
    assert Owner().work() == 3 and "sync" in clock.seconds
    clock.close()
    assert Owner.__dict__["work"].__name__ == "work"
