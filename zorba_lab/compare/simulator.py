"""Run modes side by side on the simulator: same fleet, rounds and hyper-parameters for
every mode, several seeds, and paired comparisons at equal virtual time and forward passes.

For each seed r (run seed r, data seed r) every mode trains on its own `Simulation` over the
same fleet and data. Held-out accuracy is measured after every applied round on a few hundred
examples (the curves). The comparison points (zorba_lab/compare/stats.py says where and how) are
scored on a larger held-out set: each mode's model is brought back to the version it held at
the point and evaluated there. A zeroth-order mode moves along its coefficient table (the
difference of the tables, applied as a client syncs; exact up to fp32 rounding); fedavg,
whose table stays zero, keeps every version's block weights in memory (rounds x the blocks
in fp32) and installs the one it needs.

fedavg (first-order AdamW, opt-in: add it to `modes`) is compared with zorba at equal
virtual time; its step costs FORWARDS_PER_STEP forward passes' time (`CompareSetting.
step_s_of`), and it trains at its own `fedavg_lr`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from zorba_common.messages import MemoryProfile
from zorba_common.run_defaults import (
    CENTRAL_MEZO,
    COMPARE_MAX_STEPS,
    CPU_FROZEN_DTYPE,
    FEDAVG,
    FEDZO_FULL,
    HARNESS_ROUND_S,
    REVIEW_SEQ_LEN,
    SIM_MODES,
    ZO_SIM_MODES,
    ZORBA,
    ZORBA_UNIFORM,
)
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.modes.fedavg_training import FORWARDS_PER_STEP
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.data.templates import SENTIMENT_TEMPLATE
from zorba_edge.engine.losses import evaluate_classification
from zorba_edge.engine.zo import forwards_per_step
from zorba_edge.model.sources import ModelSource
from zorba_lab.compare import stats
from zorba_server.config import AggregationConfig, RunConfig, ServerConfig
from zorba_server.harness_config import harness_run
from zorba_server.rounds import APPLIED
from zorba_server.scheduler import SchedulerConfig
from zorba_sim.fleet import Fleet
from zorba_sim.simulation import (
    RoundRecord,
    Simulation,
    SimulationConfig,
)

PAIRS = {stats.TIME: ((ZORBA, FEDZO_FULL), (ZORBA, ZORBA_UNIFORM), (ZORBA, FEDAVG)),
         stats.FORWARDS: ((ZORBA, CENTRAL_MEZO),)}
"""The paired differences reported, per axis (the issues' figures). Only the versions they
need are scored on the point set: each is a pass over >= 1,000 examples, the largest cost of
a comparison on a CPU."""


def scored_axes(mode: str, modes: Sequence[str]) -> tuple[str, ...]:
    """The axes at which `mode` is scored on the point set: those where it is in a pair of
    `modes`; both when it is in none (a mode compared with nothing still gets its figures)."""
    axes = tuple(axis for axis, pairs in PAIRS.items()
                 if any(mode in pair and set(pair) <= set(modes) for pair in pairs))
    return axes or stats.AXES
Log = Callable[[str], None]
REFERENCE_FORWARD_S = 1.3
"""Virtual seconds of one forward pass (batch 8, with its share of the perturbation work) on a
speed-1.0 device: half the 2.6 s antithetic one-direction step measured on the project's
2-core machine alone with every block of SmolLM2-135M (docs/results.md)."""


COMPARE_RUN = RunConfig(seq_len=REVIEW_SEQ_LEN, max_steps=COMPARE_MAX_STEPS,
                        round_duration_s=HARNESS_ROUND_S)
"""The server's run config with the comparison's own defaults (zorba_common.run_defaults says
why); every mode and seed runs it, with only mode and seed replaced."""


@dataclass(frozen=True)
class CompareSetting:
    """One comparison: every mode and seed runs with these, only mode and seed vary. The run
    and aggregation config are the server's, held; the rest is the comparison's own."""

    run: RunConfig = COMPARE_RUN
    """run.lr, run.lr_scaling, ...: the zeroth-order modes' (fedavg trains at `fedavg_lr`)."""
    aggregation: AggregationConfig = AggregationConfig()
    """The zeroth-order modes' rule (central-mezo, one client, is the same under every rule
    that only weighs clients against each other)."""
    modes: tuple[str, ...] = ZO_SIM_MODES
    seeds: int = 5
    rounds: int = 3
    fedavg_lr: float = 1e-5
    """fedavg's AdamW learning rate (the multi-process harness's; not tuned)."""
    reference_step_s: float | None = None
    """Virtual seconds of one step (one pool index, one scalar) on a speed-1.0 device: fixed
    (not measured per run) so every mode and seed shares one clock and a rerun gives the same
    figures. None: the forward passes per scalar x REFERENCE_FORWARD_S."""
    fedavg_step_s: float | None = None
    """Virtual seconds of one fedavg AdamW step on a speed-1.0 device; None: FORWARDS_PER_STEP
    forward passes at this comparison's forward time (`step_s_of`)."""
    curve_examples: int = 200
    point_examples: int = 1000
    dirichlet_alpha: float = 0.5
    frozen_dtype: str = CPU_FROZEN_DTYPE
    """How each virtual device would hold its frozen blocks (what budgets are checked against)."""
    device: str = "cpu"
    eval_batch_size: int = 32
    scheduler_objective: str = "coverage"
    """The zorba mode's scheduler.objective (zorba_server/scheduler.py OBJECTIVES); the
    baselines' assignments do not read it."""

    @classmethod
    def of(cls, **values: Any) -> CompareSetting:
        """A setting from flat names (a command line's): run fields replace COMPARE_RUN's,
        `aggregation` names the rule."""
        run, aggregation, own = harness_run(values, COMPARE_RUN)
        return cls(run=run, aggregation=aggregation, **own)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in SIM_MODES]
        if unknown:
            raise ValueError(f"modes {unknown} cannot run on the simulator; choose from "
                             f"{', '.join(SIM_MODES)}")
        if not self.modes:
            raise ValueError("no modes to compare")
        if self.seeds < 1 or self.rounds < 1:
            raise ValueError("seeds and rounds must be at least 1")
        for name in ("reference_step_s", "fedavg_step_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def forwards_per_scalar(self) -> float:
        """Forward passes per pool index (one reported scalar, what a "step" counts)."""
        return forwards_per_step(self.run.estimator, self.run.directions)

    @property
    def step_s(self) -> float:
        """The virtual step (one pool index) every run of this comparison uses."""
        if self.reference_step_s is not None:
            return self.reference_step_s
        return REFERENCE_FORWARD_S * self.forwards_per_scalar

    def step_s_of(self, mode: str) -> float:
        """The virtual step of `mode`: fedavg's AdamW step is `fedavg_step_s` when given, else
        FORWARDS_PER_STEP forward passes (forward and backward) at this comparison's forward
        time; a ZO step is its own forwards. The 3 is a count, not a measurement (what was
        measured, on a loaded machine, is in docs/simulator.md): give fedavg_step_s from an
        idle machine where the time axis matters."""
        if mode == FEDAVG:
            if self.fedavg_step_s is not None:
                return self.fedavg_step_s
            return self.step_s / self.forwards_per_scalar * FORWARDS_PER_STEP
        return self.step_s

    def simulation_config(self, mode: str, seed: int) -> SimulationConfig:
        run = replace(self.run, seed=seed, mode=ZORBA if mode == CENTRAL_MEZO else mode,
                      lr=self.fedavg_lr if mode == FEDAVG else self.run.lr)
        server = ServerConfig("simulated-run-secret", run=run, aggregation=self.aggregation,
                              scheduler=SchedulerConfig(objective=self.scheduler_objective))
        return SimulationConfig(server, rounds=self.rounds, reference_step_s=self.step_s_of(mode),
                                central=mode == CENTRAL_MEZO, dirichlet_alpha=self.dirichlet_alpha,
                                data_seed=seed,
                                memory=MemoryProfile(frozen_dtype=self.frozen_dtype),
                                device=self.device)


@dataclass(frozen=True)
class SeedData:
    train: Sequence[ClassificationExample]
    curve: Sequence[ClassificationExample]
    """Held-out examples evaluated after every round."""
    points: Sequence[ClassificationExample]
    """Held-out examples evaluated at the comparison points (and on the base model)."""


@dataclass
class ModeRun:
    mode: str
    seed: int
    curve: list[stats.VersionPoint]
    """The base model and every applied version, with curve accuracy."""
    at_points: dict[str, tuple[int, float]] = field(default_factory=dict)
    """axis -> (version held at the seed's common point, its accuracy on the point set), for
    the axes `scored_axes` names."""
    rounds: int = 0
    applied: int = 0
    end: dict[str, float] = field(default_factory=dict)
    """axis -> where the run ended (its last round's close, applied or not)."""
    train_s: float = 0.0
    """Wall seconds of training (rounds without the curve evaluations)."""
    curve_eval_s: float = 0.0
    point_eval_s: float = 0.0
    cpu_s: float = 0.0
    """Process CPU seconds of training and every evaluation of this run: on a shared machine,
    a better measure of its cost than wall time (idle, wall ~ cpu / threads)."""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at_points"] = {k: {"version": v, "accuracy": a} for k, (v, a) in self.at_points.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModeRun:
        """The inverse of `as_dict` (a resumed comparison's finished runs)."""
        return cls(**{**data,
                      "curve": [stats.VersionPoint(**p) for p in data["curve"]],
                      "at_points": {k: (int(v["version"]), float(v["accuracy"]))
                                    for k, v in data["at_points"].items()}})


@dataclass
class SeedResult:
    seed: int
    base_curve: float
    base_points: float
    common: dict[str, float]
    """axis -> the seed's common point (zorba_lab/compare/stats.py)."""
    runs: dict[str, ModeRun]
    acc_bias_floor: float | None = None
    """The base model with label offsets fitted on training examples, on the point examples."""

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "base_curve": self.base_curve, "base_points": self.base_points,
                "acc_bias_floor": self.acc_bias_floor,
                "common": self.common, "runs": {m: run.as_dict() for m, run in self.runs.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeedResult:
        return cls(int(data["seed"]), float(data["base_curve"]), float(data["base_points"]),
                   dict(data["common"]), {m: ModeRun.from_dict(r) for m, r in data["runs"].items()},
                   data.get("acc_bias_floor"))


# ---------------------------------------------------------------------------- running


def _batches(sim: Simulation, examples: Sequence[ClassificationExample], batch_size: int) -> list[Any]:
    task = LocalTask(list(examples), sim.source.tokenizer(), SENTIMENT_TEMPLATE)
    seq_len = sim.config.server.run.seq_len
    return [b.to(sim.config.device) for b in task.batches(batch_size, seq_len)]


def train_mode(setting: CompareSetting, sim: Simulation, base_curve: float,
               log: Log) -> tuple[ModeRun, dict[int, Any]]:
    """Run a built simulation's rounds; returns its run and what brings its model back to
    each version (`Simulation.version_state`: a coefficient table, or fedavg's weights)."""
    mode, seed = sim.config.mode, sim.config.data_seed
    tables: dict[int, Any] = {0: sim.version_state()}

    def after(record: RoundRecord) -> None:
        if record.version not in tables:  # applied, or rolled back
            tables[record.version] = sim.version_state()
        acc = "-" if record.accuracy is None else f"{record.accuracy:.4f}"
        log(f"[seed {seed} {mode}] round {record.round}/{setting.rounds} {record.status}: "
            f"{record.reports}/{record.assigned} reports, t={record.virtual_time_s:.0f} vs, "
            f"{record.forwards} forwards, accuracy {acc} ({record.wall_s:.0f} s)")

    started, cpu = time.perf_counter(), time.process_time()
    sim.run(progress=after)
    total = time.perf_counter() - started
    curve = [stats.VersionPoint(0, 0, 0.0, 0, base_curve)] + [
        stats.VersionPoint(r.version, r.round, r.virtual_time_s, r.forwards, r.accuracy)
        for previous, r in zip([0] + [p.version for p in sim.records[:-1]], sim.records, strict=True)
        if r.version != previous]  # applied rounds, and the loss guard's rollbacks
    train_s = sum(r.wall_s for r in sim.records)
    last = sim.records[-1]
    applied = sum(1 for r in sim.records if r.status == APPLIED)
    run = ModeRun(mode, seed, curve, rounds=len(sim.records), applied=applied,
                  end={stats.TIME: last.virtual_time_s, stats.FORWARDS: last.forwards},
                  train_s=train_s, curve_eval_s=total - train_s, cpu_s=time.process_time() - cpu)
    return run, tables


def score_at_points(sim: Simulation, run: ModeRun, tables: dict[int, Any],
                    common: Mapping[str, float], points: Sequence[ClassificationExample],
                    base_points: float, batch_size: int) -> None:
    """Fill `run.at_points`: the version held at each common point, scored on `points`
    (latest first, so each move undoes only the rounds after the version before)."""
    wanted = {axis: stats.version_at(run.curve, axis, x).version for axis, x in common.items()}
    scored: dict[int, float] = {0: base_points}
    current = tables[max(tables)]
    started, cpu = time.perf_counter(), time.process_time()
    batches = None
    for version in sorted(set(wanted.values()) - {0}, reverse=True):
        sim.move_to_version_(current, tables[version])
        current = tables[version]
        batches = batches or _batches(sim, points, batch_size)
        scored[version] = evaluate_classification(sim.loaded.model, batches).accuracy
    run.point_eval_s = time.perf_counter() - started
    run.cpu_s += time.process_time() - cpu
    run.at_points = {axis: (v, scored[v]) for axis, v in wanted.items()}


def run_seed(setting: CompareSetting, seed: int, source: ModelSource, fleet: Fleet,
             data: SeedData, log: Log) -> SeedResult:
    """Every mode on one seed, then each scored at the seed's common points."""
    sims: dict[str, tuple[Simulation, dict[int, Any]]] = {}
    runs: dict[str, ModeRun] = {}
    base: tuple[float, float] | None = None
    floor: float | None = None
    for mode in setting.modes:
        sim = Simulation.build(setting.simulation_config(mode, seed), source, fleet, data.train,
                               data.curve, eval_batch_size=setting.eval_batch_size)
        if base is None:  # every mode starts from the same model: score it once
            base = (sim.evaluate()[0], evaluate_classification(
                sim.loaded.model, _batches(sim, data.points, setting.eval_batch_size)).accuracy)
            floor = sim.bias_floor(heldout=_batches(sim, data.points, setting.eval_batch_size))
            log(f"[seed {seed}] base model: {base[0]:.4f} on {len(data.curve)} curve examples, "
                f"{base[1]:.4f} on {len(data.points)} point examples (bias floor {floor:.4f})")
        run, tables = train_mode(setting, sim, base[0], log)
        sims[mode], runs[mode] = (sim, tables), run
    assert base is not None
    # Each axis's point is where every mode compared on it has a model: a mode compared only
    # on the other axis (central MeZO on time, say) must not pull it earlier.
    common = {axis: stats.common_point([run.end[axis] for mode, run in runs.items()
                                        if axis in scored_axes(mode, setting.modes)]
                                       or [run.end[axis] for run in runs.values()], axis)
              for axis in stats.AXES}
    for mode, (sim, tables) in sims.items():
        run = runs[mode]
        axes = scored_axes(mode, setting.modes)
        score_at_points(sim, run, tables, {a: common[a] for a in axes}, data.points, base[1],
                        setting.eval_batch_size)
        log(f"[seed {seed} {mode}] " + "; ".join(
            f"at equal {axis} ({common[axis]:.0f}): v{v} {acc:.4f}"
            for axis, (v, acc) in run.at_points.items()))
    return SeedResult(seed, base[0], base[1], common, runs, floor)


def run_comparison(setting: CompareSetting, source: ModelSource, fleet: Fleet,
                   data_for: Callable[[int], SeedData], log: Log,
                   after_seed: Callable[[list[SeedResult]], None] | None = None,
                   done: Sequence[SeedResult] = ()) -> list[SeedResult]:
    """Seeds 0..seeds-1, each with every mode; the simulations of a seed are freed after it.
    `after_seed` sees the results so far after each seed (a long run's partial figures);
    seeds in `done` (an interrupted run's, same setting) are kept, not run again: every run is
    deterministic given its seed, so they are what running them again would give."""
    results: list[SeedResult] = [r for r in done if r.seed < setting.seeds]
    for seed in sorted(set(range(setting.seeds)) - {r.seed for r in results}):
        results.append(run_seed(setting, seed, source, fleet, data_for(seed), log))
        if after_seed is not None:
            after_seed(results)
    return results


# ---------------------------------------------------------------------------- figures


def _key(mode: str) -> str:
    return mode.replace("-", "_")


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def figures(setting: CompareSetting, results: Sequence[SeedResult]) -> dict[str, Any]:
    """The comparison's figures (the JSON object's core); pure given the results."""
    by_axis: dict[str, dict[str, dict[int, float]]] = {
        axis: {m: {r.seed: r.runs[m].at_points[axis][1] for r in results
                   if m in r.runs and axis in r.runs[m].at_points}
               for m in setting.modes} for axis in stats.AXES}
    base = {r.seed: r.base_points for r in results}
    out: dict[str, Any] = {
        "seeds": len(results),
        "base_accuracy": _mean(list(base.values())),
        # Beside every accuracy: a gain up to it is calibration of the label words.
        "acc_bias_floor": _mean([r.acc_bias_floor for r in results if r.acc_bias_floor is not None]),
        "accuracy_at_equal_virtual_time": {m: _mean(list(v.values()))
                                           for m, v in by_axis[stats.TIME].items() if v},
        "accuracy_at_equal_forwards": {m: _mean(list(v.values()))
                                       for m, v in by_axis[stats.FORWARDS].items() if v},
        "final_accuracy": {m: _mean([r.runs[m].curve[-1].accuracy for r in results  # type: ignore[misc]
                                     if m in r.runs and r.runs[m].curve[-1].accuracy is not None])
                           for m in setting.modes},
        "common_points": [{"seed": r.seed, **r.common} for r in results],
        "gain_ratio_zorba_over_central_mezo": None,
        "ci90_zorba_minus_fedzo_full": None,
        "ci90_zorba_minus_zorba_uniform": None,
        "ci90_zorba_minus_fedavg": None,
        "paired_differences": {},
    }
    for m in setting.modes:
        out[f"acc_{_key(m)}_final"] = out["final_accuracy"][m]
    modes = set(setting.modes)
    if {ZORBA, CENTRAL_MEZO} <= modes:
        out["gain_ratio_zorba_over_central_mezo"] = stats.gain_ratio(
            by_axis[stats.FORWARDS][ZORBA], by_axis[stats.FORWARDS][CENTRAL_MEZO], base)
    if len(results) >= 2:
        for axis, pairs in PAIRS.items():
            for a, b in pairs:
                if {a, b} <= modes:
                    diff = stats.paired_difference(by_axis[axis][a], by_axis[axis][b])
                    out["paired_differences"].setdefault(axis, {})[f"{a} - {b}"] = diff.as_dict()
                    if axis == stats.TIME and b in (FEDZO_FULL, ZORBA_UNIFORM, FEDAVG):
                        out[f"ci90_zorba_minus_{_key(b)}"] = list(diff.ci90)
    return out
