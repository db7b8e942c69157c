"""Benchmark the block-activation scheduler on realistic federations.

The model is SmolLM2-135M-like (30 blocks of 3.54M parameters, hidden 576, intermediate
1536, vocabulary 49152, 28.3M tied embedding parameters). Each client draws its budget
log-uniformly from 0.6 to 4 GiB, its own memory settings (batch 4 or 8, sequence 64 or
128, frozen blocks nf4 / int8 / bf16, training fp32 or bf16, with or without the fp32
revert snapshot) and a sample count from a log-normal; the per-client perturbed-parameter
cap is 8 blocks. Clients whose budget cannot hold the frozen model are excluded by the
scheduler, as they would be in a real round.

It prints progress to stderr and, with --json, one JSON object on stdout:
  solve_s_<N>, method_<N>, optimal_<N>, coverage_<N>, perturbed_params_<N>, ... for N in
  --sizes (default configuration: MILP up to milp_max_clients admitted, heuristic beyond);
  round2_*: the same federation one round later, remembering round 1 (stability);
  stage1_gap_to_lp_bound_<N>: 1 - t* / (LP-relaxation bound): a certificate that the
  stage-1 result is at least that close to optimal;
  milp_s_<N>: the MILP path's time where it was forced on (--milp-sizes);
  heuristic_gap: the heuristic against the MILP path on the same instances (stage 1:
  relative coverage shortfall; stage 2: relative excess of perturbed parameters), over
  the instances HiGHS proves optimal and over all of --gap-sizes x --gap-seeds.

    python benchmarks/scheduler.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

from zorba_common.memory_model import (
    MemorySettings,
    ModelFootprint,
    linear_memory_model,
)
from zorba_server.scheduler import (
    ClientSpec,
    Schedule,
    SchedulerConfig,
    coverage_upper_bound,
    solve_schedule,
)

GIB = 2**30
HIDDEN, INTERMEDIATE, VOCAB, LAYERS, KV_DIM = 576, 1536, 49152, 30, 192
QUANTIZABLE = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_DIM + 3 * HIDDEN * INTERMEDIATE
BLOCK_PARAMS = QUANTIZABLE + 2 * HIDDEN  # plus the two RMSNorm weights
FOOTPRINT = ModelFootprint(
    block_params=(BLOCK_PARAMS,) * LAYERS,
    quantizable_block_params=(QUANTIZABLE,) * LAYERS,
    embed_head_params=VOCAB * HIDDEN + HIDDEN,
    hidden_size=HIDDEN,
    vocab_size=VOCAB,
    num_layers=LAYERS,
    intermediate_size=INTERMEDIATE,
)
CAP_BLOCKS = 8


def make_clients(num_clients: int, seed: int) -> list[ClientSpec]:
    rng = np.random.default_rng(seed)
    budgets = np.exp(rng.uniform(np.log(0.6 * GIB), np.log(4 * GIB), num_clients))
    samples = np.maximum(1, np.round(rng.lognormal(np.log(200), 1.0, num_clients)))
    settings = [
        MemorySettings(
            train_dtype=str(rng.choice(["fp32", "bf16"])),
            frozen_dtype=str(rng.choice(["nf4", "int8", "bf16"])),
            snapshot_dtype=None if rng.random() < 0.3 else "fp32",
            batch_size=int(rng.choice([4, 8])),
            seq_len=int(rng.choice([64, 128])),
        )
        for _ in range(num_clients)
    ]
    models: dict[MemorySettings, object] = {}
    clients = []
    for i in range(num_clients):
        model = models.setdefault(settings[i], linear_memory_model(FOOTPRINT, settings[i]))
        clients.append(
            ClientSpec(
                client_id=f"client-{i:05d}",
                budget_bytes=int(budgets[i]),
                memory=model,
                weight=float(samples[i]),
                step_time_s=float(rng.uniform(0.5, 6.0)),
            )
        )
    return clients


def next_round(clients: list[ClientSpec], schedule: Schedule) -> list[ClientSpec]:
    """The same federation one round later: everyone remembers what it trained."""
    return [
        replace(c, previous=frozenset(schedule.assignments.get(c.client_id, ()))) for c in clients
    ]


def config(**overrides) -> SchedulerConfig:
    return replace(
        SchedulerConfig(max_perturbed_params=CAP_BLOCKS * BLOCK_PARAMS, round_deadline_s=60.0),
        **overrides,
    )


def summary(schedule: Schedule) -> dict[str, object]:
    return {
        "method": schedule.method,
        "optimal": schedule.optimal,
        "solve_s": round(schedule.solve_s, 4),
        "admitted": len(schedule.assignments),
        "excluded": len(schedule.excluded_clients),
        "coverage": schedule.coverage,
        "stage1_coverage": schedule.stage1_coverage,
        "perturbed_params": sum(schedule.perturbed_params.values()),
        "blocks_per_client": round(
            statistics.mean(len(b) for b in schedule.assignments.values()), 2
        )
        if schedule.assignments
        else 0.0,
    }


def timed(clients: list[ClientSpec], cfg: SchedulerConfig, label: str) -> Schedule:
    print(f"  {label}: {len(clients)} clients ...", file=sys.stderr, flush=True)
    schedule = solve_schedule(clients, FOOTPRINT.block_params, cfg)
    s = summary(schedule)
    print(f"    {s}", file=sys.stderr, flush=True)
    return schedule


def stability(before: Schedule, after: Schedule) -> float:
    """Fraction of last round's (client, block) pairs the next round keeps."""
    kept = total = 0
    for cid, blocks in before.assignments.items():
        total += len(blocks)
        kept += len(set(blocks) & set(after.assignments.get(cid, ())))
    return kept / total if total else 1.0


def gap(args: argparse.Namespace) -> dict[str, object]:
    """Heuristic against the MILP path on the same instances.

    Where HiGHS proves both stages optimal, the gap is to the optimum; elsewhere it is
    to the MILP path's result (which starts from the heuristic and is never worse)."""
    rows = []
    for n in args.gap_sizes:
        for seed in range(args.gap_seeds):
            clients = make_clients(n, 1000 + seed)
            exact = timed(
                clients,
                config(time_limit_s=args.time_limit, milp_max_clients=n),
                f"gap: MILP path, seed {seed}",
            )
            greedy = timed(clients, config(milp_max_clients=0), f"gap: heuristic, seed {seed}")
            rows.append(
                {
                    "clients": n,
                    "admitted": len(exact.assignments),
                    "optimal": exact.optimal,
                    "stage1": 1 - greedy.stage1_coverage / exact.stage1_coverage,
                    "stage2": sum(greedy.perturbed_params.values())
                    / sum(exact.perturbed_params.values())
                    - 1,
                    "milp_s": exact.solve_s,
                }
            )

    def stats(selected: list[dict], key: str) -> dict[str, float | None]:
        values = [r[key] for r in selected]
        return {
            "max": round(max(values), 5) if values else None,
            "mean": round(statistics.mean(values), 5) if values else None,
        }

    proven = [r for r in rows if r["optimal"]]
    return {
        "definition": "stage1: 1 - t_heuristic / t_milp; stage2: params_heuristic / "
        "params_milp - 1 (relative; 0 = as good)",
        "proven_optimal_instances": len(proven),
        "proven_optimal_stage1": stats(proven, "stage1"),
        "proven_optimal_stage2": stats(proven, "stage2"),
        "all_instances": len(rows),
        "all_stage1": stats(rows, "stage1"),
        "all_stage2": stats(rows, "stage2"),
        "by_size": {
            str(n): {
                "proven": sum(r["optimal"] for r in rows if r["clients"] == n),
                "stage1_max": round(max(r["stage1"] for r in rows if r["clients"] == n), 5),
                "stage2_max": round(max(r["stage2"] for r in rows if r["clients"] == n), 5),
                "milp_s_mean": round(
                    statistics.mean(r["milp_s"] for r in rows if r["clients"] == n), 3
                ),
            }
            for n in args.gap_sizes
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 1000, 10000],
        help="federation sizes solved with the default configuration",
    )
    parser.add_argument(
        "--lp-bound-max",
        type=int,
        default=1000,
        help="certify stage 1 against the LP bound up to this size (10,000 takes minutes)",
    )
    parser.add_argument(
        "--milp-sizes",
        type=int,
        nargs="*",
        default=[100],
        help="also time the MILP path forced on at these sizes",
    )
    parser.add_argument(
        "--gap-sizes",
        type=int,
        nargs="*",
        default=[6, 8, 10, 20, 30],
        help="sizes for the heuristic's gap to the MILP path",
    )
    parser.add_argument("--gap-seeds", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=10.0, help="MILP time limit (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    result: dict[str, object] = {
        "command": "python benchmarks/scheduler.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "model": "SmolLM2-135M-like, 30 blocks x 3.54M params",
        "cap_blocks": CAP_BLOCKS,
        "milp_max_clients": SchedulerConfig().milp_max_clients,
    }
    print("default configuration (MILP up to milp_max_clients, heuristic beyond):", file=sys.stderr)
    for n in args.sizes:
        clients = make_clients(n, args.seed)
        cfg = config(time_limit_s=args.time_limit)
        first = timed(clients, cfg, "round 1")
        second = timed(next_round(clients, first), cfg, "round 2 (remembers round 1)")
        for key, value in summary(first).items():
            result[f"{key}_{n}"] = value
        result[f"round2_solve_s_{n}"] = round(second.solve_s, 4)
        result[f"round2_pairs_kept_{n}"] = round(stability(first, second), 4)
        if n <= args.lp_bound_max:
            print("    LP bound ...", file=sys.stderr, flush=True)
            bound = coverage_upper_bound(
                clients, FOOTPRINT.block_params, cfg, first.required_blocks
            )
            result[f"stage1_gap_to_lp_bound_{n}"] = round(1 - first.stage1_coverage / bound, 5)
    if args.milp_sizes:
        print("MILP path forced on:", file=sys.stderr)
    for n in args.milp_sizes:
        forced = config(time_limit_s=args.time_limit, milp_max_clients=n)
        s = timed(make_clients(n, args.seed), forced, "milp")
        result[f"milp_s_{n}"] = round(s.solve_s, 4)
        result[f"milp_optimal_{n}"] = s.optimal
    if args.gap_sizes:
        print("heuristic gap to the MILP:", file=sys.stderr)
        result["heuristic_gap"] = gap(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
