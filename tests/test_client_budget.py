"""The client's memory budget: sizes as people write them, margin and cap, and admission."""

from __future__ import annotations

import math

import pytest

from zorba_common.memory_model import (
    MEMORY_HEADROOM,
    MemorySettings,
    ModelFootprint,
    client_memory_bytes,
    linear_memory_model,
)
from zorba_edge.client.admission import admit
from zorba_edge.client.byte_sizes import format_size, parse_margin, parse_size
from zorba_edge.client.errors import BudgetError, DeviceError
from zorba_edge.client.profiling import MIN_DEFAULT_MARGIN, compute_budget

FOOTPRINT = ModelFootprint(
    block_params=(1_000_000, 2_000_000, 1_000_000),
    quantizable_block_params=(900_000, 1_800_000, 900_000),
    embed_head_params=3_000_000, hidden_size=256, vocab_size=1000, num_layers=3,
    intermediate_size=512,
)
SETTINGS = MemorySettings(frozen_dtype="nf4", runtime_bytes=100 * 2**20)


@pytest.mark.parametrize(("text", "expected"), [
    ("1.5GiB", 1536 * 2**20), ("1536MiB", 1536 * 2**20), ("2G", 2 * 2**30),
    ("800MB", 800_000_000), ("123456", 123456), ("64 KiB", 65536), ("1e3", 1000),
    ("0.5tib", 2**39),
])
def test_sizes_parse_binary_and_decimal_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1.5 parsecs", "-1GiB", "0", "1..5G"])
def test_a_malformed_size_names_the_accepted_forms(text: str) -> None:
    with pytest.raises(DeviceError, match=r"1\.5GiB|positive"):
        parse_size(text)


def test_margins_are_sizes_or_percentages() -> None:
    assert parse_margin("15%") == (0, 0.15)
    assert parse_margin("512MiB") == (512 * 2**20, 0.0)
    assert parse_margin("0") == (0, 0.0)
    with pytest.raises(DeviceError, match="percentage"):
        parse_margin("120%")


def test_format_size_picks_a_readable_unit() -> None:
    assert format_size(1536 * 2**20) == "1.50 GiB"
    assert format_size(812.3 * 2**20) == "812.3 MiB"
    assert format_size(512) == "512 B"


def test_the_budget_is_measured_memory_less_the_margin_or_the_cap_whichever_is_smaller() -> None:
    measured = 8 * 2**30
    default = compute_budget(measured)
    assert default.margin_bytes == int(measured * 0.10)
    assert default.budget_bytes == measured - int(measured * 0.10)
    assert default.limited_by == "measured free memory"

    capped = compute_budget(measured, cap_bytes=2 * 2**30)
    assert capped.budget_bytes == 2 * 2**30
    assert capped.limited_by == "--memory-budget"

    # A cap above what is free does not raise the budget.
    loose = compute_budget(measured, margin_bytes=2**30, cap_bytes=100 * 2**30)
    assert loose.budget_bytes == 7 * 2**30
    assert loose.limited_by == "measured free memory"


def test_a_small_device_keeps_at_least_the_minimum_default_margin() -> None:
    budget = compute_budget(1 * 2**30)
    assert budget.margin_bytes == MIN_DEFAULT_MARGIN
    assert budget.budget_bytes == 2**30 - MIN_DEFAULT_MARGIN


def test_admission_reports_what_the_scheduler_will_see() -> None:
    model = linear_memory_model(FOOTPRINT, SETTINGS)
    # The usable part of the budget (what the scheduler fills: all but MEMORY_HEADROOM).
    usable = model.fixed_bytes + model.block_bytes[0] + model.block_bytes[2] + 1
    budget = math.ceil(usable / (1 - MEMORY_HEADROOM))
    admission = admit(FOOTPRINT, SETTINGS, budget)
    assert admission.fixed_bytes == client_memory_bytes(FOOTPRINT, SETTINGS, ())
    assert admission.block_bytes == model.block_bytes
    # The two small blocks fit together, the large one does not fit beside them.
    assert admission.max_blocks == 2


def test_admission_refuses_when_even_the_frozen_model_does_not_fit() -> None:
    frozen = client_memory_bytes(FOOTPRINT, SETTINGS, ())
    with pytest.raises(BudgetError, match="even with every block frozen") as info:
        admit(FOOTPRINT, SETTINGS, frozen - 1)
    assert "--memory-budget" in str(info.value)


def test_admission_refuses_when_no_block_can_be_trained_and_suggests_a_smaller_precision() -> None:
    settings = MemorySettings(frozen_dtype="int8", runtime_bytes=100 * 2**20)
    frozen = client_memory_bytes(FOOTPRINT, settings, ())
    with pytest.raises(BudgetError, match="cheapest block") as info:
        admit(FOOTPRINT, settings, math.ceil((frozen + 10) / (1 - MEMORY_HEADROOM)))
    assert "--frozen-dtype nf4" in str(info.value)


def test_run_admission_uses_the_runs_batch_shape_and_names_it(tiny_llama_config_factory) -> None:
    """A device that does not fit the probe's batch 8 x 64 but fits the run's batch 1 x 16
    is admitted; a run at a larger shape is refused with the numbers it was checked at."""
    from zorba_common.messages import HyperParams, MemoryProfile, RunInfo
    from zorba_edge.client import assembly
    from zorba_edge.client.profiling import Budget, DeviceSurvey
    from zorba_edge.model.sources import RandomInitSource

    source = RandomInitSource(tiny_llama_config_factory(vocab_size=50_000))
    memory = MemoryProfile(train_dtype="fp32", frozen_dtype="bf16", frozen_other_dtype="fp32",
                           embed_dtype="fp32", snapshot_dtype="fp32", runtime_bytes=10 * 2**20)
    footprint = assembly.footprint_of(source)
    small = client_memory_bytes(footprint, memory.settings(1, 16), (0,))
    probe = client_memory_bytes(footprint, memory.settings(8, 64), (0,))
    assert small < probe
    budget_bytes = (small + probe) // 2

    def run(batch_size: int, seq_len: int) -> RunInfo:
        return RunInfo("r", 0, 4, 4, source.fingerprint, HyperParams(1e-3, 1e-3, batch_size, seq_len),
                       60.0, 30.0, 1e3)

    with pytest.raises(BudgetError):
        admit(footprint, memory.settings(8, 64), budget_bytes)
    survey = DeviceSurvey.__new__(DeviceSurvey)
    budget = Budget.__new__(Budget)
    object.__setattr__(budget, "budget_bytes", budget_bytes)
    report = assembly.device_report(source, None, survey, budget, memory,  # type: ignore[arg-type]
                                    step_time_s=None, refuse=False)
    assert report.admission is None
    assembly.check_run(run(1, 16), source, memory, budget_bytes)
    with pytest.raises(BudgetError, match="batch_size=8, seq_len=64"):
        assembly.check_run(run(8, 64), source, memory, budget_bytes)


def test_a_client_with_its_snapshot_on_disk_is_admitted_more_blocks_at_the_same_budget() -> None:
    """A client's round snapshot is spilled to disk (zorba_edge.engine.snapshot): its profile
    declares none, each trainable block costs its weights and its direction's bit a parameter
    over the frozen block, and a budget that fitted one block with an fp32 host copy fits two
    without."""
    import dataclasses

    from zorba_common.memory_model import DIRECTION_BYTES_PER_PARAM
    from zorba_edge.client.assembly import memory_profile
    from zorba_edge.model.loading import LoadConfig

    spilled = memory_profile(LoadConfig(frozen_dtype="nf4"), runtime_bytes=100 * 2**20).settings(8, 64)
    assert spilled.snapshot_dtype is None
    host_copy = dataclasses.replace(spilled, snapshot_dtype="fp32")
    model = linear_memory_model(FOOTPRINT, spilled)
    for b, params in enumerate(FOOTPRINT.block_params):
        frozen = 0.9 * params * (0.5 + 4 / 64) + 0.1 * params * 4.0
        assert model.block_bytes[b] == round(params * (4.0 + DIRECTION_BYTES_PER_PARAM) - frozen)
    budget = client_memory_bytes(FOOTPRINT, host_copy, (0,))
    assert linear_memory_model(FOOTPRINT, host_copy).blocks_within(budget) == 1
    assert model.blocks_within(budget) == 2
