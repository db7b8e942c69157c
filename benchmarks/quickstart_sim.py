"""The quickstart's federation on the simulator, for the benchmarks that vary its settings.

Four virtual laptops with the memory budgets the quickstart had when the sweeps in
docs/results.md were measured (1.0 / 1.1 / 1.3 / 1.7 GiB; the quickstart's own are now
zorba_lab.quickstart.DEFAULT_BUDGETS, and these stay so the recorded figures reproduce), each
running one step in `REFERENCE_STEP_S` virtual seconds, fine-tune the packaged SmolLM2-135M
(`make models`) on movie reviews (held-out split of seed 0, Dirichlet split of the run's seed).
`benchmarks/lr_scaling.py` and `benchmarks/sweep.py` build their runs here, so both measure the
same federation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from zorba_common.run_defaults import CENTRAL_MEZO
from zorba_edge.client.assembly import footprint_of
from zorba_edge.data.movie_reviews import load_movie_reviews
from zorba_edge.data.splits import train_heldout_split
from zorba_edge.model.pretrained import packaged_model_path
from zorba_edge.model.sources import open_source
from zorba_lab.compare.simulator import COMPARE_RUN
from zorba_server.config import AggregationConfig, RunConfig, config_from_dict
from zorba_server.harness_config import harness_run
from zorba_sim.fleet import GIB, DeviceClass, DeviceGroup, Fleet
from zorba_sim.simulation import Simulation, SimulationConfig

BUDGETS_GIB = (1.0, 1.1, 1.3, 1.7)
REFERENCE_STEP_S = 2.0
"""Virtual seconds of one step on every device: a 30-second round leaves room for the default
8 steps and the quickstart's 12 after the transfers."""


@dataclass(frozen=True)
class QuickstartRun:
    """What a benchmark may vary: the server's run and aggregation config, held (by default
    the comparison's: the quickstart's, 8 steps a round), and the benchmark's own fields."""

    run: RunConfig = COMPARE_RUN
    aggregation: AggregationConfig = AggregationConfig()
    central: bool = False
    """central-mezo: one device with all the data trains every block (the no-federation
    reference); `run.mode` is then not used."""
    cap_blocks: int | None = None
    """The scheduler's max_perturbed_params as this many of the model's largest blocks."""
    rounds: int = 8
    heldout: int = 200

    @classmethod
    def of(cls, **values: Any) -> QuickstartRun:
        """From flat names: run fields replace COMPARE_RUN's, `aggregation` names the rule,
        `mode` may be central-mezo."""
        if values.get("mode") == CENTRAL_MEZO:
            del values["mode"]
            values["central"] = True
        run, aggregation, own = harness_run(values, COMPARE_RUN)
        return cls(run=run, aggregation=aggregation, **own)

    def with_run(self, **changes: Any) -> QuickstartRun:
        return replace(self, run=replace(self.run, **changes))


def quickstart_simulation(run: QuickstartRun) -> Simulation:
    """The simulation of `run`, built and ready for `run_round` (the model is loaded)."""
    examples = load_movie_reviews()
    train_idx, heldout_idx = train_heldout_split(len(examples), 0.1, 0)
    train = [examples[i] for i in train_idx]
    heldout = [examples[i] for i in heldout_idx][: run.heldout]
    fleet = Fleet(tuple(DeviceGroup(DeviceClass(f"budget-{b}GiB", int(b * GIB), 1.0, 50, 50), 1, 0)
                        for b in BUDGETS_GIB))
    source = open_source(packaged_model_path())
    scheduler: dict[str, Any] = {} if run.cap_blocks is None else {
        "max_perturbed_params": run.cap_blocks * max(footprint_of(source).block_params)}
    server = config_from_dict({"enrolment_secret": "benchmark-secret", "scheduler": scheduler})
    server = replace(server, run=run.run, aggregation=run.aggregation)
    return Simulation.build(SimulationConfig(server, rounds=run.rounds,
                                             reference_step_s=REFERENCE_STEP_S,
                                             data_seed=run.run.seed,
                                             central=run.central),
                            source, fleet, train, heldout)
