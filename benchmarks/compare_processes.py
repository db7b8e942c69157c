"""ZorBA against its baselines as real processes on this machine (issue 5): the system-level
harness of `benchmarks/compare.py --harness processes` (the default harness is the simulator).

Runs the quickstart's federation (a zorba-server and four `zorba-edge run` clients with
budgets 1.0/1.1/1.3/1.7 GiB, SmolLM2-135M-Instruct, movie reviews split non-IID) once per
run mode and repetition, one after another, each mode for the same number of rounds of the
same duration; then replays held-out accuracy after every round from the server's record
(zorba_lab/replay.py) and writes docs/results.md with its plots. Modes:

    zorba          the scheduler's heterogeneous block activation (the system)
    zorba-uniform  the same number of random blocks on every client
    fedzo-full     zeroth-order on every block; clients that cannot hold them are excluded
    fedavg         first-order AdamW on every block, full weights up and down each round

Printed figures (one JSON object with --json; progress goes to stderr):

    peak_ratio_zorba_over_fedavg   largest client peak of zorba / of fedavg
    bytes_ratio_zorba_over_fedavg  (up + down) bytes per client per round, zorba / fedavg
    acc_<mode>                     held-out accuracy at equal wall time (mean over reps; the
                                   _spread and _at_equal_rounds keys alongside)
    targets_met                    peak ratio <= 0.4, bytes ratio <= 1e-4, acc_zorba >=
                                   acc_fedzo_full and >= acc_zorba_uniform

Ratios over a mode left out of --modes are null. Learning rates are not tuned.
Needs `make models`.

    python benchmarks/compare.py --harness processes --quick --json   # 3 reps x 4 modes x 6 rounds of 30 s
    python benchmarks/compare.py --harness processes --json           # 3 reps x 4 modes x 8 rounds of 30 s

It writes its own section of docs/results.md (zorba_lab/compare/page.py), leaving the
simulator's section and the discussion as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from results_page import save_plots, write_section  # the sibling module (benchmarks/ is on sys.path)

from zorba_common.errors import ZorbaError
from zorba_common.run_defaults import FEDAVG, RUN_MODES, ZORBA
from zorba_lab.compare import processes_report as report
from zorba_lab.compare.page import PROCESSES, processes_section
from zorba_lab.federation import FederationPlan, FederationResult
from zorba_lab.quickstart import DEFAULT_BUDGETS, plan_from_args
from zorba_lab.quickstart import build_parser as quickstart_parser
from zorba_server.config import RunConfig

if TYPE_CHECKING:
    from zorba_lab.results import ClientFigures

FULL = {"reps": 3, "rounds": 8, "round_duration": 30.0, "eval_examples": 300}
# Rounds of 30 s, not shorter: a fedavg client needs ~10 s a step plus its upload, and the
# clients' first round includes installing their trainable blocks.
QUICK = {"reps": 3, "rounds": 6, "round_duration": 30.0, "eval_examples": 200}
Progress = Callable[[str], None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/compare.py --harness processes", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(RUN_MODES),
                   help="run modes, comma-separated (default %(default)s)")
    p.add_argument("--reps", type=int, help=f"repetitions; rep r uses seed r and data seed r "
                   f"(default {FULL['reps']}, --quick {QUICK['reps']})")
    p.add_argument("--rounds", type=int, help=f"applied rounds per run (default {FULL['rounds']}, "
                   f"--quick {QUICK['rounds']})")
    p.add_argument("--round-duration", type=float, help="seconds per round (default "
                   f"{FULL['round_duration']:g}, --quick {QUICK['round_duration']:g})")
    p.add_argument("--eval-examples", type=int, help="held-out reviews (default "
                   f"{FULL['eval_examples']}, --quick {QUICK['eval_examples']})")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate every n-th version, always the last (default %(default)s)")
    p.add_argument("--lr", type=float, default=RunConfig.lr,
                   help="learning rate of the zeroth-order modes, the server's default; not tuned "
                   "(default %(default)s)")
    p.add_argument("--fedavg-lr", type=float, default=1e-5,
                   help="fedavg's AdamW learning rate; not tuned (default %(default)s)")
    p.add_argument("--zorba-epsilon", type=float,
                   help="the zorba mode's scheduler epsilon, for a sensitivity run (default: the "
                   "server's, 0.05; larger gives lighter assignments)")
    p.add_argument("--quick", action="store_true",
                   help="a short setting: " + ", ".join(f"{k.replace('_', '-')} {v:g}"
                                                        for k, v in QUICK.items())
                   + " (explicit flags still win)")
    p.add_argument("--out", type=Path, help="run directory (default runs/compare-<timestamp>)")
    p.add_argument("--results", type=Path, default=Path("docs/results.md"),
                   help="the generated page; plots beside it as <name>_*.png (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--report-only", type=Path, metavar="RUN_DIR",
                   help="train nothing: rewrite the page and the JSON from a finished run "
                   "directory's runs.json and setting.json (the other flags are ignored)")
    return p


@dataclasses.dataclass(frozen=True)
class Setting:
    kind: str
    """quick or full: which defaults filled the flags not given."""
    modes: tuple[str, ...]
    reps: int
    rounds: int
    round_duration: float
    eval_examples: int
    eval_every: int
    lr: float
    fedavg_lr: float
    zorba_epsilon: float | None = None

    def lr_of(self, mode: str) -> float:
        return self.fedavg_lr if mode == FEDAVG else self.lr


def resolve(args: argparse.Namespace) -> Setting:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in RUN_MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes: {', '.join(unknown) or 'none given'}; choose from "
                         f"{', '.join(RUN_MODES)}")
    defaults = QUICK if args.quick else FULL
    picked = {k: getattr(args, k) if getattr(args, k) is not None else v
              for k, v in defaults.items()}
    if picked["reps"] < 1 or picked["rounds"] < 1 or args.eval_every < 1:
        raise SystemExit("--reps, --rounds and --eval-every must be at least 1")
    kind = "quick" if args.quick else "full"
    overridden = [f"--{k.replace('_', '-')}" for k, v in picked.items() if v != defaults[k]]
    if overridden:  # say so: a "full" page from a 2-round run would mislead
        kind = f"custom ({kind} defaults, {', '.join(overridden)} given)"
    return Setting(kind=kind, modes=modes, eval_every=args.eval_every, lr=args.lr,
                   fedavg_lr=args.fedavg_lr, zorba_epsilon=args.zorba_epsilon, **picked)


def plan_for(setting: Setting, mode: str, rep: int, out_dir: Path) -> FederationPlan:
    """The quickstart's plan (its budgets and defaults), in `mode`, seeded by the repetition."""
    args = quickstart_parser().parse_args([
        "--budgets", ",".join(DEFAULT_BUDGETS), "--rounds", str(setting.rounds),
        "--round-duration", str(setting.round_duration), "--lr", str(setting.lr_of(mode)),
        "--seed", str(rep), "--data-seed", str(rep), "--eval-examples",
        str(setting.eval_examples)])
    plan = plan_from_args(args, out_dir)
    scheduler = plan.scheduler
    if mode == ZORBA and setting.zorba_epsilon is not None:
        scheduler = dataclasses.replace(scheduler, epsilon=setting.zorba_epsilon)
    return dataclasses.replace(plan, run=dataclasses.replace(
        plan.run, mode=mode, keep_weight_versions=mode == FEDAVG), scheduler=scheduler)


# ---------------------------------------------------------------------------- one run


def _run_created_at(db_path: Path) -> float | None:
    from zorba_lab.record import RecordError, read_record

    try:
        return read_record(db_path).snapshot.created_at
    except RecordError:
        return None


def exclusion_reasons(db_path: Path) -> dict[str, str]:
    """client_id -> the scheduler's latest reason for leaving it out of a round."""
    from zorba_lab.results import read_rounds

    reasons: dict[str, str] = {}
    for row in read_rounds(db_path):
        reasons.update(row.excluded)
    return reasons


def client_results(plan: FederationPlan, result: FederationResult,
                   figures: list[ClientFigures]) -> list[report.ClientResult]:
    """Per client of the plan: peak, bytes per round, and why it took no part if it did not."""
    reasons = exclusion_reasons(result.db_path)
    rows = []
    for f in figures:
        excluded = None
        if f.rounds_reported == 0:
            excluded = reasons.get(f.client_id, "reported no round")
        rows.append(report.ClientResult(
            f.name, f.budget_bytes, f.peak_bytes, f.rounds_reported, f.bytes_up_per_round,
            f.bytes_down_per_round, tuple(f.blocks_per_round), excluded))
    registered = {f.name for f in figures}
    exits = {c.setup.name: c.exit_code for c in result.clients}
    for setup in plan.clients:
        if setup.name not in registered:  # it exited before registering (e.g. over budget)
            rows.append(report.ClientResult(
                setup.name, setup.budget_bytes, 0, 0, 0.0, 0.0,
                excluded=f"never registered (exit code {exits.get(setup.name)})"))
    return sorted(rows, key=lambda c: c.name)


def local_steps(db_path: Path, batch_size: int) -> int:
    """Local steps over all reports: ZO reports list theirs; fedavg's list none and carry
    num_samples = steps x batch size (fewer only for a client with under a batch of data)."""
    from zorba_lab.results import read_reports

    return sum(len(r.steps) or -(-r.num_samples // batch_size)
               for _round, _cid, r in read_reports(db_path))


def run_one(setting: Setting, mode: str, rep: int, out_dir: Path,
            progress: Progress) -> report.ModeRun:
    """Train one mode, then replay its accuracy per version; models never overlap in time."""
    from zorba_lab.federation import run_federation
    from zorba_lab.replay import replay_run
    from zorba_lab.results import client_figures, read_rounds

    plan = plan_for(setting, mode, rep, out_dir)
    result = asyncio.run(run_federation(plan, progress=progress))
    rounds = read_rounds(result.db_path)
    if not rounds:
        raise ZorbaError(f"{mode}: no round opened; see {out_dir}/server.log")
    first_open = rounds[0].opened_at
    applied = [r for r in rounds if r.status == "applied" and r.closed_at is not None]
    train_s = applied[-1].closed_at - first_open if applied else 0.0  # type: ignore[operator]
    replay_started = time.perf_counter()
    replayed = replay_run(plan, result.db_path, setting.eval_examples, every=setting.eval_every,
                          progress=progress)
    replay_s = time.perf_counter() - replay_started
    points = tuple(report.AccuracyPoint(p.version, p.round,
                                        0.0 if p.closed_at is None else p.closed_at - first_open,
                                        p.accuracy, p.loss) for p in replayed.points)
    figures = client_figures(result.db_path, {c.setup.name: c.traffic for c in result.clients},
                             {c.setup.name: c.process.sampled_peak_rss for c in result.clients})
    created_at = _run_created_at(result.db_path)
    evals = [p.eval_s for p in replayed.points]
    timings = {
        "federation_wall_s": result.wall_s,
        "startup_s": first_open - created_at if created_at is not None else float("nan"),
        "train_s": train_s,
        "replay_s": replay_s,
        "replay_load_s": replayed.load_s,
        "replay_apply_s": replayed.apply_s,
        "replay_eval_s_per_version": sum(evals) / len(evals),
    }
    return report.ModeRun(mode, rep, points, tuple(client_results(plan, result, figures)), train_s,
                          local_steps(result.db_path, plan.run.batch_size), len(applied),
                          {k: round(v, 2) for k, v in timings.items()})


# ---------------------------------------------------------------------------- all runs


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB "
            f"RAM, {platform.system()}")


def setting_record(setting: Setting, out_dir: Path) -> dict[str, Any]:
    plan = plan_for(setting, setting.modes[0], 0, out_dir)
    return {
        "kind": setting.kind, "modes": ", ".join(setting.modes), "reps": setting.reps,
        "rounds": setting.rounds, "round_duration_s": setting.round_duration,
        "eval_examples": setting.eval_examples, "eval_every": setting.eval_every,
        "lr (zeroth-order modes, not tuned)": setting.lr,
        "lr (fedavg AdamW, not tuned)": setting.fedavg_lr,
        "scheduler epsilon (zorba)": setting.zorba_epsilon if setting.zorba_epsilon is not None
        else "0.05 (server default)",
        "budgets": ", ".join(DEFAULT_BUDGETS), "seeds": "rep r: seed r, data seed r",
        "model": plan.model or "SmolLM2-135M-Instruct (packaged GGUF)",
        "data": f"{plan.data}, Dirichlet alpha {plan.dirichlet_alpha} across clients",
        "mu": plan.run.mu, "batch_size": plan.run.batch_size, "seq_len": plan.run.seq_len,
        "max_steps": plan.run.max_steps, "pool_size": plan.run.pool_size,
        "frozen_dtype (clients)": plan.frozen_dtype, "threads per client": plan.threads,
    }


def run_all(setting: Setting, out_dir: Path,
            log: Progress) -> tuple[list[report.ModeRun], list[dict[str, str]]]:
    runs: list[report.ModeRun] = []
    failures: list[dict[str, str]] = []
    for rep in range(setting.reps):
        for mode in setting.modes:
            tag = f"[rep {rep + 1}/{setting.reps} {mode}]"
            log(f"{tag} starting ({setting.rounds} rounds of {setting.round_duration:g} s)")
            started = time.monotonic()
            try:
                run = run_one(setting, mode, rep, out_dir / f"rep{rep}-{mode}",
                              lambda line, tag=tag: log(f"{tag} {line}"))
            except (ZorbaError, OSError, RuntimeError) as exc:
                # One broken mode must not cost the others' hour: record it and go on.
                log(f"{tag} FAILED: {exc}")
                failures.append({"mode": mode, "rep": str(rep), "error": str(exc)})
                continue
            runs.append(run)
            (out_dir / "runs.json").write_text(
                json.dumps([r.as_dict() for r in runs], indent=2) + "\n")
            last = run.points[-1]
            log(f"{tag} done in {time.monotonic() - started:.0f} s: v{last.version} accuracy "
                f"{last.accuracy:.4f}, trained {run.train_s:.0f} s, timings {dict(run.timings)}")
    return runs, failures


def train(args: argparse.Namespace, command: str,
          log: Progress) -> tuple[Path, dict[str, Any], list[report.ModeRun], list[dict[str, str]]]:
    setting = resolve(args)
    out_dir = (args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"setting": setting_record(setting, out_dir), "command": command,
              "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    (out_dir / "setting.json").write_text(json.dumps(header, indent=2) + "\n")
    runs, failures = run_all(setting, out_dir, log)
    return out_dir, header, runs, failures


def load_finished(out_dir: Path) -> tuple[dict[str, Any], list[report.ModeRun],
                                          list[dict[str, str]]]:
    """What `train` left in a run directory (runs.json is rewritten after every run)."""
    header = json.loads((out_dir / "setting.json").read_text())
    runs = [report.ModeRun.from_dict(r) for r in json.loads((out_dir / "runs.json").read_text())]
    done = json.loads((out_dir / "compare.json").read_text()) if (out_dir / "compare.json").exists() else {}
    return header, runs, done.get("failures", [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(["python benchmarks/compare.py --harness processes",
                        *(argv if argv is not None else sys.argv[1:])])
    stream = sys.stderr if args.json else sys.stdout

    def log(line: str) -> None:
        print(line, file=stream, flush=True)

    if args.report_only is not None:
        out_dir = args.report_only.resolve()
        header, runs, failures = load_finished(out_dir)
    else:
        # Anything a library prints goes where the progress goes: stdout holds the JSON alone.
        with contextlib.redirect_stdout(stream):
            out_dir, header, runs, failures = train(args, command, log)
    if not runs:
        log("no run finished: nothing to report")
        return 1
    plots = save_plots(report.plots(runs), args.results)
    page = report.Page(header["setting"], header["command"], header["machine"], header["date"],
                       plots=plots, failures=tuple(f"rep {f['rep']} {f['mode']}: {f['error']}"
                                                   for f in failures))
    write_section(args.results, PROCESSES, processes_section(report.markdown(runs, page, args.results)))
    summaries = report.summarize(runs)
    result = {
        **report.headline(summaries), **header,
        "modes": {m: s.as_dict() for m, s in summaries.items()},
        "runs": [r.as_dict() for r in runs],
        "failures": failures,
        "results": str(args.results), "plots": {k: str(v) for k, v in plots.items()},
        "out_dir": str(out_dir),
    }
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(report.mode_table(summaries)))
        print(json.dumps({k: result[k] for k in (
            "peak_ratio_zorba_over_fedavg", "bytes_ratio_zorba_over_fedavg", "acc_zorba",
            "acc_zorba_uniform", "acc_fedzo_full", "acc_fedavg", "targets_met")}, indent=2))
        print(f"page: {args.results}; runs: {out_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
