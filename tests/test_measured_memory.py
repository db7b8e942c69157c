"""A client measures its runtime with the model loaded, and the server's first plan uses it:
the memory model then counts what a real process holds before any round has measured a peak."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from engine_fakes import engine, open_next, received
from server_fakes import FOOTPRINT, profile

from zorba_common.memory_model import (
    MemorySettings,
    client_memory_bytes,
    held_weights_bytes,
    linear_memory_model,
    measured_runtime_bytes,
    usable_budget,
)
from zorba_common.messages import MemoryProfile
from zorba_edge.client import assembly
from zorba_edge.client.profiling import StepTiming
from zorba_server import calibration
from zorba_server.members import Member

MIB = 2**20


def test_the_measured_runtime_is_what_the_process_holds_beyond_the_weights() -> None:
    settings = MemorySettings(frozen_dtype="bf16", runtime_bytes=0)
    weights = held_weights_bytes(FOOTPRINT, settings)
    assert measured_runtime_bytes(FOOTPRINT, settings, int(weights) + 300 * MIB) == pytest.approx(
        300 * MIB, abs=1)
    # The model's frozen total with that runtime is the held memory plus the activations.
    runtime = measured_runtime_bytes(FOOTPRINT, settings, int(weights) + 300 * MIB)
    with_it = dataclasses.replace(settings, runtime_bytes=runtime)
    bare = dataclasses.replace(settings, runtime_bytes=0)
    assert client_memory_bytes(FOOTPRINT, with_it, ()) - client_memory_bytes(FOOTPRINT, bare, ()) \
        == pytest.approx(300 * MIB, abs=2)
    assert measured_runtime_bytes(FOOTPRINT, settings, 10) == 0  # never negative


def budget_for_blocks(memory: MemoryProfile, blocks: int) -> int:
    """A budget whose usable part holds exactly `blocks` blocks under `memory`'s model."""
    model = linear_memory_model(FOOTPRINT, memory.settings(8, 64))
    need = model.fixed_bytes + sum(sorted(model.block_bytes)[:blocks])
    return int(need / 0.95) + 2


def joined(e: object, name: str, memory: MemoryProfile, budget: int) -> Member:
    p = dataclasses.replace(profile(budget=budget, name=name), memory=memory)
    e.check_registration(p)  # type: ignore[attr-defined]
    member = Member(name, p, 0.0, 1.0, 0.0, p.step_time_s)
    e.add_member(member)  # type: ignore[attr-defined]
    return member


def test_a_client_whose_measured_fixed_part_exceeds_the_model_gets_fewer_blocks_at_first(
        tmp_path: Path) -> None:
    before_load = MemoryProfile(frozen_dtype="bf16", runtime_bytes=100_000)
    block = linear_memory_model(FOOTPRINT, before_load.settings(8, 64)).block_bytes[0]
    measured = dataclasses.replace(before_load, runtime_bytes=100_000 + 2 * block)
    budget = budget_for_blocks(before_load, 4)  # all four blocks, by the reading before loading
    first_plans = {}
    for name, memory in (("read-before-loading", before_load), ("measured-loaded", measured)):
        e = engine(tmp_path / name, batch_size=8, seq_len=64)
        joined(e, name, memory, budget)
        blocks = open_next(e).clients[name].blocks
        model = linear_memory_model(FOOTPRINT, memory.settings(8, 64))
        assert model.total(blocks) <= usable_budget(budget)
        first_plans[name] = len(blocks)
    assert first_plans == {"read-before-loading": 4, "measured-loaded": 2}


def test_calibration_still_follows_the_measured_peaks(tmp_path: Path) -> None:
    e = engine(tmp_path, batch_size=8, seq_len=64)
    memory = MemoryProfile(frozen_dtype="bf16", runtime_bytes=50_000)
    member = joined(e, "a", memory, budget_for_blocks(memory, 4))
    plan = open_next(e)
    predicted = e.memory_model(member.profile, 1.0).total(plan.clients["a"].blocks)
    report = received(e, "a", peak=int(predicted * 1.2))
    assert calibration.measured(e.config.run, e.members, plan, {"a": report})["a"] == \
        pytest.approx(1.2, rel=1e-6)


def test_the_profile_takes_the_runtime_measured_with_the_model_loaded() -> None:
    footprint = FOOTPRINT
    before = MemoryProfile(frozen_dtype="bf16", runtime_bytes=400 * MIB)
    weights = held_weights_bytes(footprint, before.settings(8, 64))
    timing = StepTiming(0.1, 3)
    loaded = assembly.LoadProbe(timing, int(weights) + 470 * MIB)
    assert assembly.measured_memory(before, footprint, loaded).runtime_bytes == \
        pytest.approx(470 * MIB, abs=1)
    # Never below the reading before the load; nothing measured off the CPU.
    low = assembly.LoadProbe(timing, int(weights) + 10 * MIB)
    assert assembly.measured_memory(before, footprint, low) == before
    assert assembly.measured_memory(before, footprint, assembly.LoadProbe(timing, None)) == before


def test_the_timing_probe_measures_the_process_with_the_model_loaded(
        tiny_llama_config_factory) -> None:
    from zorba_edge.model.loading import LoadConfig
    from zorba_edge.model.sources import RandomInitSource

    source = RandomInitSource(tiny_llama_config_factory())
    probe = assembly.probe_step_time(source, LoadConfig(frozen_dtype="bf16"), repeats=1,
                                     batch_size=2, seq_len=8)
    assert probe.timing.forward_s > 0
    assert probe.held_bytes is not None
    footprint = assembly.footprint_of(source)
    settings = MemorySettings(frozen_dtype="bf16", frozen_other_dtype="fp32")
    assert probe.held_bytes > held_weights_bytes(footprint, settings)
