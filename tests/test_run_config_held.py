"""One run config, held, not copied: every harness (the simulator, the comparison, the
quickstart, the Flower app) holds the server's RunConfig and AggregationConfig and declares
only its own fields; a harness default that differs from the server's is stated once, in
zorba_common.run_defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from quickstart_sim import QuickstartRun  # benchmarks/ (conftest.py)

from zorba_common import run_defaults
from zorba_common.memory_model import BYTES_PER_PARAM, ModelFootprint, linear_memory_model, usable_budget
from zorba_common.messages import MemoryProfile
from zorba_flower.settings import ClientAppSettings, ServerAppSettings, server_config
from zorba_lab.compare.simulator import COMPARE_RUN, CompareSetting
from zorba_lab.federation import QUICKSTART_RUN, FederationPlan
from zorba_lab.quickstart import DEFAULT_BUDGETS
from zorba_server.config import AggregationConfig, RunConfig, ServerConfig
from zorba_server.modes import MODES
from zorba_server.scheduler import SchedulerConfig
from zorba_sim.cli import SIM_RUN, Settings
from zorba_sim.fleet import load_fleet, parse_size
from zorba_sim.simulation import SimulationConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent

HARNESSES = (Settings, CompareSetting, FederationPlan, ClientAppSettings, ServerAppSettings,
             QuickstartRun, SimulationConfig)
SERVER_SECTIONS = (RunConfig, AggregationConfig, SchedulerConfig)


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("harness", HARNESSES, ids=lambda h: h.__name__)
def test_no_harness_declares_a_field_of_the_servers_config(harness: type) -> None:
    copied = {name for section in SERVER_SECTIONS for name in _names(section)} & _names(harness)
    assert copied == set(), (f"{harness.__name__} declares {sorted(copied)} of the server's "
                             "config: hold a RunConfig/AggregationConfig instead")


def test_a_harness_default_differs_from_the_servers_only_where_run_defaults_says() -> None:
    server, d = RunConfig(), run_defaults
    review = {"seq_len": d.REVIEW_SEQ_LEN}
    short_rounds = review | {"round_duration_s": d.HARNESS_ROUND_S}
    for run, stated in ((SIM_RUN, review | {"max_steps": d.SIM_MAX_STEPS}),
                        (COMPARE_RUN, short_rounds | {"max_steps": d.COMPARE_MAX_STEPS}),
                        (QUICKSTART_RUN, short_rounds | {"max_steps": d.QUICKSTART_MAX_STEPS})):
        differs = {f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)
                   if getattr(run, f.name) != getattr(server, f.name)}
        assert differs == stated


def test_every_harness_holds_frozen_blocks_as_a_cpu_client_does() -> None:
    for harness in (Settings(), CompareSetting(), FederationPlan(Path("."), ())):
        assert harness.frozen_dtype == run_defaults.CPU_FROZEN_DTYPE


def test_the_flower_app_runs_at_the_servers_defaults() -> None:
    """flower_app/pyproject.toml once shipped lr = 0.01, 100x the server's."""
    app = tomllib.loads((ROOT / "flower_app" / "pyproject.toml").read_text())
    values = _flat(app["tool"]["flwr"]["app"]["config"])
    config = server_config(values)
    assert config == ServerConfig(config.enrolment_secret,
                                  run=RunConfig(min_clients=2, max_rounds=3))
    # Flower 1.42 refuses a --run-config key the app does not list, so every run and
    # aggregation setting with a TOML default is listed (at the server's default, above).
    for section, cls in (("run", RunConfig), ("aggregation", AggregationConfig)):
        for f in dataclasses.fields(cls):
            if isinstance(f.default, bool | int | float | str):
                assert f"{section}.{f.name.replace('_', '-')}" in values, (section, f.name)


def _flat(table: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_one_list_of_modes_dtypes_and_estimators() -> None:
    assert tuple(MODES) == run_defaults.RUN_MODES
    assert set(run_defaults.DTYPES) == set(BYTES_PER_PARAM)
    assert set(run_defaults.SIM_MODES) == {*run_defaults.RUN_MODES, run_defaults.CENTRAL_MEZO}


def test_the_defaults_module_imports_without_torch() -> None:
    code = ("import sys; import zorba_common.run_defaults, zorba_server.config; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


SMOLLM2_135M = ModelFootprint(block_params=(3_540_096,) * 30, quantizable_block_params=(3_538_944,) * 30,
                              embed_head_params=28_312_128, hidden_size=576, vocab_size=49152,
                              num_layers=30, intermediate_size=1536)
"""The packaged SmolLM2-135M's parameter counts (assembly.footprint_of; opening the GGUF takes
seconds, and benchmarks/assignments.py reads them from it)."""


def test_the_comparisons_budgets_force_partial_assignments() -> None:
    """compare_fleet.toml once held the quickstart's budgets, at which every device held all 30
    blocks in every mode, so ZorBA could not differ from its baselines (issue 26). Each device
    must train at least one block, and the devices must hold different numbers of blocks, the
    smallest few and the largest all."""
    fleet = load_fleet(ROOT / "benchmarks" / "compare_fleet.toml")
    memory = MemoryProfile(frozen_dtype=CompareSetting().frozen_dtype).settings(
        COMPARE_RUN.batch_size, COMPARE_RUN.seq_len)
    model = linear_memory_model(SMOLLM2_135M, memory)
    held = sorted(model.blocks_within(usable_budget(device.memory_budget_bytes, COMPARE_RUN.memory_headroom))
                  for device, _ in fleet.devices())
    assert held[0] >= 1
    assert len(set(held)) == len(held)
    assert held[0] <= SMOLLM2_135M.num_blocks // 4 and held[-1] == SMOLLM2_135M.num_blocks


def test_the_quickstarts_fleet_holds_the_quickstarts_budgets() -> None:
    """quickstart_fleet.toml is the simulator's stand-in for the quickstart's federation: it
    once kept 1.0 GiB after the quickstart moved to 1.2 GiB, where a CPU client holding frozen
    blocks in bf16 cannot train even one block."""
    fleet = load_fleet(ROOT / "benchmarks" / "quickstart_fleet.toml")
    budgets = sorted(device.memory_budget_bytes for device, _ in fleet.devices())
    assert budgets == sorted(parse_size(b, "DEFAULT_BUDGETS") for b in DEFAULT_BUDGETS)
