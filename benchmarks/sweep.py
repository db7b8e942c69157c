"""The learning defaults against their neighbours, on the simulator (issue 11, lever 7).

One factor at a time around the defaults (lr 1e-4, mu 1e-3, 12 steps a round for 5 rounds, a
pool of 1024 seeds), on the quickstart's federation (`benchmarks/quickstart_sim.py`: four virtual
laptops with the quickstart's budgets, SmolLM2-135M, movie reviews), for each seed:

- lr: 5e-5, 1e-4, 2e-4, 4e-4;
- mu: 1e-4, 1e-3, 1e-2;
- steps per round at equal scalars (60 a client): 6 x 10 rounds, 12 x 5, 20 x 3;
- pool size: 16 and 1024 seeds (a run this short draws 60 indices; 16 makes every block move
  inside a 16-dimensional subspace, what a long run would do to a small pool).

Every run ends with held-out accuracy and loss on the same reviews; the base model is scored
once per seed. Runs go to `--jobs` worker processes (one torch thread each); each finished run
is appended to `--out` (JSON lines), and a rerun with the same `--out` skips what it holds.
A run is 60 scalars per client; on the project's 2-core machine, idle, two at a time took about
six minutes (docs/results.md quotes the figures).

    python benchmarks/sweep.py --json                 # both seeds, every factor: 18 runs
    python benchmarks/sweep.py --factors lr --seeds 0 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from quickstart_sim import QuickstartRun, quickstart_simulation

SCALARS_PER_CLIENT = 60
DEFAULT = QuickstartRun.of(max_steps=12, rounds=5, round_duration_s=32.0)
FACTORS: dict[str, tuple[Any, ...]] = {
    "lr": (5e-5, 1e-4, 2e-4, 4e-4),
    "mu": (1e-4, 1e-3, 1e-2),
    "steps": (6, 12, 20),
    "pool": (16, 1024),
}


def with_factor(base: QuickstartRun, factor: str, value: Any) -> QuickstartRun:
    """`base` with one factor set. Steps keep the scalars per client and give each round the
    time its steps need: the server plans compute_fraction (0.8) of a round for them, at
    `quickstart_sim.REFERENCE_STEP_S` (2 s) a step, plus 2 s of slack."""
    if factor == "lr":
        return base.with_run(lr=value)
    if factor == "mu":
        return base.with_run(mu=value)
    if factor == "pool":
        return base.with_run(pool_size=value)
    if factor == "steps":
        return dataclasses.replace(base.with_run(max_steps=value, round_duration_s=2.5 * value + 2.0),
                                   rounds=SCALARS_PER_CLIENT // value)
    raise ValueError(f"unknown factor {factor!r}: use one of {', '.join(FACTORS)}")


def grid(factors: list[str], seeds: list[int]) -> Iterator[tuple[str, Any, QuickstartRun]]:
    """(factor, value, run) for every point; the default is listed under "default" once per
    seed, not again under each factor."""
    for seed in seeds:
        base = DEFAULT.with_run(seed=seed)
        yield "default", None, base
        for factor in factors:
            for value in FACTORS[factor]:
                run = with_factor(base, factor, value)
                if run != base:
                    yield factor, value, run


def run_point(factor: str, value: Any, run: QuickstartRun, heldout: int,
              score_base: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    started = time.time()
    sim = quickstart_simulation(dataclasses.replace(run, heldout=heldout))
    point: dict[str, Any] = {"factor": factor, "value": value, "seed": run.run.seed,
                             "run": dataclasses.asdict(run)}
    if score_base:
        point["base_accuracy"], point["base_loss"] = sim.evaluate()
    records = [sim.run_round() for _ in range(run.rounds)]
    point["accuracy"], point["loss"] = sim.evaluate()
    point["statuses"] = [r.status for r in records]
    point["forwards"] = sim.forwards
    point["lr_at_end"] = records[-1].lr
    point["wall_s"] = round(time.time() - started, 1)
    return point


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (factor, value): mean accuracy, loss and gain over the base, over seeds."""
    base = {p["seed"]: p["base_accuracy"] for p in points if "base_accuracy" in p}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["factor"], json.dumps(p["value"])), []).append(p)
    rows = []
    for (factor, value), members in groups.items():
        gains = [p["accuracy"] - base[p["seed"]] for p in members if p["seed"] in base]
        rows.append({"factor": factor, "value": json.loads(value),
                     "seeds": sorted(p["seed"] for p in members),
                     "accuracy": statistics.fmean(p["accuracy"] for p in members),
                     "loss": statistics.fmean(p["loss"] for p in members),
                     "gain": statistics.fmean(gains) if gains else None,
                     "per_seed": {p["seed"]: round(p["accuracy"], 4) for p in members}})
    order = ["default", *FACTORS]
    return sorted(rows, key=lambda r: (order.index(r["factor"]), r["value"] or 0))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| factor | value | seeds | held-out accuracy | gain over base | held-out loss | per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "-" if r["gain"] is None else f"{r['gain']:+.3f}"
        value = "-" if r["value"] is None else f"{r['value']:g}"
        per_seed = ", ".join(f"{s}: {a:.3f}" for s, a in sorted(r["per_seed"].items()))
        lines.append(f"| {r['factor']} | {value} | {len(r['seeds'])} | {r['accuracy']:.3f} | "
                     f"{gain} | {r['loss']:.3f} | {per_seed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", default=",".join(FACTORS),
                        help="comma-separated, of " + ", ".join(FACTORS) + " (default: all)")
    parser.add_argument("--seeds", default="0,1", help="run and data seeds (default %(default)s)")
    parser.add_argument("--heldout", type=int, default=200,
                        help="held-out reviews scored at the end of every run (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes, one torch thread each (default %(default)s)")
    parser.add_argument("--out", type=Path,
                        default=Path(f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"),
                        help="finished runs, one JSON line each; an existing file's runs are "
                             "kept and not rerun (default runs/sweep-<time>.jsonl)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (progress goes to stderr)")
    args = parser.parse_args()
    factors = [f for f in args.factors.split(",") if f]
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown:
        parser.error(f"unknown factor(s) {', '.join(unknown)}: use {', '.join(FACTORS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    finished = {(p["factor"], json.dumps(p["value"]), p["seed"]) for p in done}
    todo = [(f, v, r) for f, v, r in grid(factors, seeds)
            if (f, json.dumps(v), r.seed) not in finished]
    print(f"sweep: {len(todo)} runs to go ({len(done)} already in {args.out}), "
          f"{args.jobs} at a time", file=sys.stderr, flush=True)
    started = time.time()
    points = list(done)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_point, f, v, r, args.heldout, f == "default"): (f, v, r.seed)
                   for f, v, r in todo}
        for future in as_completed(futures):
            point = future.result()
            points.append(point)
            with args.out.open("a") as out:
                out.write(json.dumps(point) + "\n")
            print(f"[{time.time() - started:6.0f} s] seed {point['seed']} {point['factor']} "
                  f"{point['value']}: accuracy {point['accuracy']:.3f}, loss {point['loss']:.3f} "
                  f"({len(points) - len(done)}/{len(todo)})", file=sys.stderr, flush=True)
    rows = summarise(points)
    result = {"setting": {"default": dataclasses.asdict(DEFAULT), "factors": {f: FACTORS[f] for f in factors},
                          "seeds": seeds, "heldout": args.heldout,
                          "scalars_per_client": SCALARS_PER_CLIENT},
              "out": str(args.out), "rows": rows, "wall_s": round(time.time() - started, 1)}
    print(json.dumps(result) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
