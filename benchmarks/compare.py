"""ZorBA against its baselines on the simulator: several seeds, paired comparisons at equal
virtual time and equal forward passes (issues 10 and 11).

Every mode (zorba, zorba-uniform, fedzo-full, central-mezo) runs on the same fleet
(benchmarks/compare_fleet.toml: four budgets that hold 4 to 30 of SmolLM2's blocks), rounds
and hyper-parameters; rep r uses run seed r and data seed r. Held-out accuracy is measured
after every round on a few hundred reviews (the curves) and at the comparison points on >= 1,000
(zorba_lab/compare/stats.py says how the points are chosen). fedavg (first-order AdamW) runs on
the simulator too when added to --modes (compared with zorba at equal virtual time, at
--fedavg-lr); `--harness processes` runs the multi-process federation
(benchmarks/compare_processes.py) for system-level figures (memory peaks, bytes). Writes the
simulator's section of docs/results.md and its plots; the discussion is kept.

Printed figures (one JSON object with --json; progress goes to stderr):

    gain_ratio_zorba_over_central_mezo  ZorBA's accuracy gain over the base model / central
                                        MeZO's, at equal forward passes (target >= 0.9)
    ci90_zorba_minus_fedzo_full         paired bootstrap 90% interval of the accuracy
    ci90_zorba_minus_zorba_uniform      difference at equal virtual time (target: low > 0)
    ci90_zorba_minus_fedavg             the same against fedavg (when it is in --modes)
    acc_<mode>_final                    final accuracy per mode (curve set, mean over seeds)
    acc_bias_floor                      the base model with one offset per label fitted on
                                        training reviews (point set, mean over seeds): a gain
                                        up to it is calibration, not the task

Needs `make models`.

    python benchmarks/compare.py --quick --json    # 2 seeds x 4 modes x 2 rounds: minutes
    python benchmarks/compare.py --json            # 5 seeds x 4 modes x 3 rounds: ~1 h here
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_FLEET = Path(__file__).with_name("compare_fleet.toml")
# The default is sized to finish in about an hour on the project's 2-core machine when it is
# otherwise idle, from its measured costs (README: a forward of 8 x 64 tokens 0.70 s): per seed
# ~430 training forwards (3 federated modes x 4 clients x 3 rounds x (8 scalars = two one-sided
# batches of 4 directions, 10 forwards, + 1 check forward), and central MeZO's 33; ~5 min),
# 4 x 3 x 200 curve examples (~2.5 min) and up to 6 x 1,000 point examples (~5-6 min).
# Scoring >= 1,000 examples is the largest cost; longer runs (more rounds) belong on a GPU
# (--device cuda).
FULL = {"seeds": 5, "rounds": 3, "max_steps": 8, "curve_examples": 200, "point_examples": 1000}
QUICK = {"seeds": 2, "rounds": 2, "max_steps": 4, "curve_examples": 64, "point_examples": 128}
HARNESSES = ("simulator", "processes")


def build_parser() -> argparse.ArgumentParser:
    from zorba_common.readout import READOUT_DIRECTIONS_HELP, READOUT_LR_HELP, READOUT_TRUST_RADIUS_HELP
    from zorba_common.run_defaults import DTYPES, ESTIMATORS, SIM_MODES
    from zorba_lab.compare.simulator import REFERENCE_FORWARD_S, CompareSetting
    from zorba_server.aggregation_rules import RULES, rules_help
    from zorba_server.config import LR_SCALINGS
    from zorba_server.run_help import LR_SCALING_HELP
    from zorba_server.scheduler import OBJECTIVES

    d = CompareSetting()
    p = argparse.ArgumentParser(prog="benchmarks/compare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--harness", choices=HARNESSES, default="simulator",
                   help="simulator (default), or processes: a real server and client processes "
                   "per mode (its own flags: --harness processes --help)")
    p.add_argument("--modes", default=",".join(d.modes),
                   help=f"comma-separated, of {', '.join(SIM_MODES)} (default %(default)s; "
                   "add fedavg to compare it at equal virtual time)")
    for name, what in (("seeds", "seeds; seed r is run seed r and data seed r"),
                       ("rounds", "rounds per run (applied or not)"),
                       ("max-steps", "most local steps (pool indices, one scalar each) per "
                        "client and round; a batch measures --directions of them"),
                       ("curve-examples", "held-out reviews scored after every round"),
                       ("point-examples", "held-out reviews scored at the comparison points")):
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=int,
                       help=f"{what} (default {FULL[key]}, --quick {QUICK[key]})")
    p.add_argument("--lr", type=float, default=d.run.lr, help="ZO learning rate, every mode "
                   "(default %(default)s, the quickstart's; not tuned)")
    p.add_argument("--lr-scaling", default=d.run.lr_scaling, choices=LR_SCALINGS,
                   help=f"the zeroth-order modes' run.lr_scaling: {LR_SCALING_HELP} "
                        "(default %(default)s)")
    p.add_argument("--aggregation", default=d.aggregation.method, choices=list(RULES),
                   help=f"the zeroth-order modes' aggregation.method: {rules_help()} "
                        "(default %(default)s)")
    p.add_argument("--fedavg-lr", type=float, default=d.fedavg_lr,
                   help="fedavg's AdamW learning rate (default %(default)s; not tuned)")
    p.add_argument("--scheduler-objective", default=d.scheduler_objective, choices=OBJECTIVES,
                   help="the zorba mode's scheduler.objective (docs/scheduler.md; default "
                   "%(default)s)")
    p.add_argument("--mu", type=float, default=d.run.mu, help="perturbation scale (default %(default)s)")
    p.add_argument("--estimator", default=d.run.estimator, choices=list(ESTIMATORS),
                   help="zeroth-order estimator, every mode (default %(default)s, the quickstart's)")
    p.add_argument("--directions", type=int, default=d.run.directions,
                   help="directions per batch (default %(default)s, the quickstart's)")
    p.add_argument("--readout-directions", type=int, default=d.run.readout_directions, metavar="N",
                   help=f"{READOUT_DIRECTIONS_HELP} (default %(default)s)")
    p.add_argument("--readout-lr", type=float, default=d.run.readout_lr,
                   help=f"{READOUT_LR_HELP} (default %(default)s)")
    p.add_argument("--readout-trust-radius", type=float, default=d.run.readout_trust_radius,
                   metavar="FRACTION", help=f"{READOUT_TRUST_RADIUS_HELP} (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.run.batch_size, help="default %(default)s")
    p.add_argument("--seq-len", type=int, default=d.run.seq_len, help="default %(default)s")
    p.add_argument("--pool-size", type=int, default=d.run.pool_size, help="default %(default)s")
    p.add_argument("--round-duration", type=float, default=d.run.round_duration_s,
                   help="virtual seconds per round (default %(default)s)")
    p.add_argument("--reference-step-s", type=float, default=d.reference_step_s,
                   help="virtual seconds of one step on a speed-1.0 device, the same for every "
                   "run so that all share one clock (default: forward passes per scalar x "
                   f"{REFERENCE_FORWARD_S} s, half a two-forward step over every block of "
                   "SmolLM2-135M at batch 8 measured on the project's 2-core machine alone, "
                   "docs/results.md)")
    p.add_argument("--fedavg-step-s", type=float, default=d.fedavg_step_s,
                   help="virtual seconds of one fedavg AdamW step on a speed-1.0 device "
                   "(default: 3 forward passes' time, forward and backward, a count; what was "
                   "measured is in docs/simulator.md)")
    p.add_argument("--fleet", default=str(DEFAULT_FLEET),
                   help="a fleet TOML file or CLASS=COUNT,... (default %(default)s)")
    p.add_argument("--frozen-dtype", default=d.frozen_dtype, choices=DTYPES,
                   help="how each device would hold frozen blocks, for its budget (default %(default)s)")
    p.add_argument("--model", help="base model path (default: the packaged SmolLM2-135M)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the one model lives")
    p.add_argument("--quick", action="store_true", help="a few minutes: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (explicit flags still win)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue an interrupted run from RUN_DIR/partial.json: its finished "
                   "seeds are kept and the others run (the same flags as that run; --seeds may "
                   "be larger); the results go to RUN_DIR")
    p.add_argument("--out", type=Path, help="run directory for compare.json (default "
                   "runs/compare-sim-<timestamp>)")
    p.add_argument("--results", type=Path, default=Path("docs/results.md"),
                   help="the page whose simulator section is rewritten (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (progress goes to stderr)")
    return p


def resolve(args: argparse.Namespace) -> tuple[Any, str]:
    from zorba_lab.compare.simulator import CompareSetting

    defaults = QUICK if args.quick else FULL
    picked = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    kind = "quick" if args.quick else "default"
    overridden = [f"--{k.replace('_', '-')}" for k, v in picked.items() if v != defaults[k]]
    if overridden:  # say so: a "default" page from a 1-seed run would mislead
        kind = f"custom ({kind}, {', '.join(overridden)} given)"
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    try:
        setting = CompareSetting.of(
            modes=modes, lr=args.lr, lr_scaling=args.lr_scaling, aggregation=args.aggregation,
            fedavg_lr=args.fedavg_lr, scheduler_objective=args.scheduler_objective,
            mu=args.mu, estimator=args.estimator,
            directions=args.directions, batch_size=args.batch_size, seq_len=args.seq_len,
            readout_directions=args.readout_directions, readout_lr=args.readout_lr,
            readout_trust_radius=args.readout_trust_radius,
            pool_size=args.pool_size, round_duration_s=args.round_duration,
            reference_step_s=args.reference_step_s, fedavg_step_s=args.fedavg_step_s,
            frozen_dtype=args.frozen_dtype,
            device=args.device, **picked)
    except ValueError as exc:
        raise SystemExit(f"benchmarks/compare.py: {exc}") from None
    return setting, kind


SHOWN_RUN_FIELDS = ("lr", "lr_scaling", "mu", "estimator", "directions", "batch_size", "seq_len",
                    "pool_size", "max_steps", "round_duration_s")
"""Run fields the page always lists; any other is listed where it is not the server's default."""


def setting_view(setting: Any) -> dict[str, Any]:
    """The page's flat view of a setting: its own fields, `run.X` and `aggregation.X`."""
    from zorba_server.config import AggregationConfig, RunConfig

    out = {k: v for k, v in dataclasses.asdict(setting).items() if k not in ("run", "aggregation")}
    for prefix, config, default in (("run", setting.run, RunConfig()),
                                    ("aggregation", setting.aggregation, AggregationConfig())):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if f.name in SHOWN_RUN_FIELDS or prefix == "aggregation" or value != getattr(default, f.name):
                out[f"{prefix}.{f.name}"] = value
    return out


def resumable(setting: Any) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: every setting but the seed
    count."""
    return {k: v for k, v in dataclasses.asdict(setting).items() if k != "seeds"}


def resumed_seeds(run_dir: Path, setting: Any) -> list[Any]:
    """The finished seeds of an interrupted run, refused (SystemExit) when its settings differ
    from these: a figure over seeds run with different settings would mean nothing."""
    from zorba_lab.compare.simulator import SeedResult

    path = run_dir / "partial.json"
    try:
        partial = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"benchmarks/compare.py: cannot resume from {path}: {exc}") from None
    if "seed_results" not in partial:
        raise SystemExit(f"benchmarks/compare.py: {path} was written before runs could resume "
                         "(it holds no per-seed results): start a new run")
    theirs, ours = partial.get("setting", {}), json.loads(json.dumps(resumable(setting)))
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        raise SystemExit(f"benchmarks/compare.py: {path} was run with other settings ("
                         + ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
                                     for k in differ) + "): give the same flags as that run")
    return [SeedResult.from_dict(r) for r in partial["seed_results"]]


def seed_data(seed: int, curve: int, points: int) -> Any:
    """Movie reviews for seed r: its training split, and the first `curve` / `points` of its
    held-out split in one seeded order (so the curve set is part of the point set)."""
    from zorba_edge.client import assembly
    from zorba_lab.compare.simulator import SeedData

    choice = assembly.DataChoice(spec="movie-reviews", seed=seed)
    return SeedData(assembly.training_examples(choice),
                    assembly.heldout_examples(dataclasses.replace(choice, max_examples=curve)),
                    assembly.heldout_examples(dataclasses.replace(choice, max_examples=points)))


def timings(results: list[Any]) -> dict[str, float]:
    """What this run cost per unit, to size other settings (wall seconds on this machine; the
    process CPU seconds alongside, less affected by other work on a shared machine)."""
    import torch

    runs = [run for r in results for run in r.runs.values()]
    forwards = sum(run.end["forwards"] for run in runs)
    rounds = sum(run.rounds for run in runs)
    return {
        "train_s": sum(run.train_s for run in runs),
        "train_s_per_forward": sum(run.train_s for run in runs) / forwards if forwards else 0.0,
        "curve_eval_s": sum(run.curve_eval_s for run in runs),
        "curve_eval_s_per_round": sum(run.curve_eval_s for run in runs) / rounds if rounds else 0.0,
        "point_eval_s": sum(run.point_eval_s for run in runs),
        "cpu_s": sum(run.cpu_s for run in runs),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--harness", choices=HARNESSES, default="simulator")
    harness, rest = pre.parse_known_args(argv)
    if harness.harness == "processes":
        import compare_processes  # the sibling script (benchmarks/ is on sys.path when run)

        return compare_processes.main(rest)
    args = build_parser().parse_args(argv)
    from compare_processes import machine
    from results_page import save_plots, write_section

    from zorba_common.run_dirs import new_run_dir
    from zorba_edge.client import assembly
    from zorba_lab.compare import page as compare_page
    from zorba_lab.compare.simulator import figures, run_comparison
    from zorba_sim.fleet import fleet_from_counts, load_fleet

    setting, kind = resolve(args)
    command = " ".join(["python benchmarks/compare.py", *argv])
    stream = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        print(line, file=stream, flush=True)

    fleet = load_fleet(args.fleet) if args.fleet.endswith(".toml") else fleet_from_counts(args.fleet)
    done = resumed_seeds(args.resume, setting) if args.resume else []
    given = args.resume or args.out
    out_dir = given.resolve() if given else new_run_dir("compare-sim")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    def save_partial(done: list[Any]) -> None:
        # A long run cut short (a lent GPU's time limit, a killed job) keeps its finished seeds,
        # and --resume continues from them.
        partial = {**figures(setting, done), "seeds_done": len(done), "of_seeds": setting.seeds,
                   "wall_s": time.perf_counter() - started, "timings": timings(done),
                   "setting": resumable(setting), "seed_results": [r.as_dict() for r in done]}
        (out_dir / "partial.json").write_text(json.dumps(partial, indent=2) + "\n")
        log(f"{len(done)}/{setting.seeds} seeds done: {out_dir / 'partial.json'}")

    with contextlib.redirect_stdout(stream):  # stdout holds the JSON alone
        source = assembly.open_model(args.model)
        results = run_comparison(setting, source, fleet,
                                 lambda s: seed_data(s, setting.curve_examples, setting.point_examples),
                                 log, after_seed=save_partial, done=done)
    wall_s = time.perf_counter() - started
    setting_record = {"kind": kind, **setting_view(setting),
                      "step_s": setting.step_s,
                      **({"fedavg_step_s": setting.step_s_of("fedavg")} if "fedavg" in setting.modes
                         else {}),
                      "fleet": args.fleet, "model": args.model or "SmolLM2-135M-Instruct (packaged GGUF)",
                      "data": "movie-reviews, rep r: held-out split and Dirichlet split of data seed r",
                      "seeds": f"{setting.seeds} (rep r: run seed r, data seed r)"}
    setting_record["modes"] = ", ".join(setting.modes)
    header = {"setting": setting_record, "command": command, "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "wall_s": wall_s}
    result = {**figures(setting, results), **header, "timings": timings(results),
              "runs": [run.as_dict() for r in results for run in r.runs.values()],
              "results": str(args.results), "out_dir": str(out_dir)}
    plots = save_plots(compare_page.sim_plots(setting, results), args.results)
    result["plots"] = {k: str(v) for k, v in plots.items()}
    write_section(args.results, compare_page.SIMULATOR, compare_page.sim_markdown(
        setting, results, result, header, plots, args.results))
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps({k: result[k] for k in (
            "gain_ratio_zorba_over_central_mezo", "ci90_zorba_minus_fedzo_full",
            "ci90_zorba_minus_zorba_uniform", "ci90_zorba_minus_fedavg", "final_accuracy",
            "accuracy_at_equal_virtual_time", "accuracy_at_equal_forwards", "timings")}, indent=2))
        print(f"page: {args.results}; run: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
