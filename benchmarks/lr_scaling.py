"""Step sizes and perturbed dimensions on the simulator: one run, its held-out loss per round.

The quickstart's federation as virtual devices (budgets 1.0 / 1.1 / 1.3 / 1.7 GiB, laptop
speed), SmolLM2-135M (`make models`), movie reviews, one seed; held-out loss and accuracy after
every round. What varies: run.lr_scaling (`dimension` against `none`), lr, the estimator, the run
mode, the aggregation rule, and a cap on the blocks each client perturbs (the scheduler's
max_perturbed_params, in blocks). docs/learning.md and docs/scheduler.md quote its figures.

    python benchmarks/lr_scaling.py --scaling dimension --lr 1e-4 --rounds 8 --json
    python benchmarks/lr_scaling.py --scaling none --cap-blocks 1 --rounds 4 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from quickstart_sim import QuickstartRun, quickstart_simulation

from zorba_common.run_defaults import ESTIMATORS, ONE_SIDED, ZO_SIM_MODES
from zorba_server.aggregation_rules import RULES
from zorba_server.config import LR_SCALINGS, AggregationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling", choices=LR_SCALINGS, default="none",
                        help="run.lr_scaling (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-4, help="default %(default)s")
    parser.add_argument("--rounds", type=int, default=8, help="default %(default)s")
    parser.add_argument("--estimator", choices=ESTIMATORS, default=ONE_SIDED,
                        help="default %(default)s")
    parser.add_argument("--directions", type=int, default=4,
                        help="directions per batch (default %(default)s)")
    parser.add_argument("--mode", choices=ZO_SIM_MODES, default="zorba",
                        help="run mode (default %(default)s)")
    parser.add_argument("--cap-blocks", type=int,
                        help="scheduler.max_perturbed_params as this many of the model's largest "
                             "blocks (default: no cap)")
    parser.add_argument("--aggregation", choices=list(RULES), default=AggregationConfig.method,
                        help="aggregation.method (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="run seed and data seed")
    parser.add_argument("--heldout", type=int, default=200, help="held-out reviews scored per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    sim = quickstart_simulation(QuickstartRun.of(
        seed=args.seed, lr=args.lr, lr_scaling=args.scaling, estimator=args.estimator,
        directions=args.directions, mode=args.mode, cap_blocks=args.cap_blocks,
        aggregation=args.aggregation, rounds=args.rounds, heldout=args.heldout))
    accuracy, loss = sim.evaluate()
    result = {"mode": args.mode, "cap_blocks": args.cap_blocks,
              "scaling": args.scaling, "aggregation": args.aggregation, "lr": args.lr,
              "estimator": args.estimator,
              "directions": args.directions, "seed": args.seed, "heldout": args.heldout,
              "rounds": [{"round": 0, "forwards": 0, "accuracy": accuracy, "loss": loss}]}
    for _ in range(args.rounds):
        record = sim.run_round()
        accuracy, loss = sim.evaluate()
        result["rounds"].append({"round": record.round, "status": record.status,
                                 "forwards": record.forwards, "train_loss": record.train_loss,
                                 "accuracy": accuracy, "loss": loss})
        print(json.dumps(result["rounds"][-1]), file=sys.stderr, flush=True)
    assert sim.engine.last_plan is not None
    result["blocks"] = {cid: len(p.blocks) for cid, p in sim.engine.last_plan.clients.items()}
    result["wall_s"] = time.time() - started
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
