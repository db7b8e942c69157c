"""Robust aggregation under attack, on the simulator: one malicious client of ten.

Ten always-online virtual devices with a laptop's budget (6 GiB, speed 1.0), SmolLM2-135M
(`make models`), movie reviews, one seed. One client (`--attacker`, default v000000) runs its
honest local steps and then sends every projected gradient scaled (`scale`, x100 by
default) or negated (`sign-flip`), or honest scalars with a check loss of 0.0 and then 1e6
(`guard-veto`, an attack on the loss guard: issue 27); the simulator hands that report to the real engine
(`zorba_sim/adversary.py`), so `check_report`, `accept_report`, the aggregation rule and the
loss guard see what a server would. For every aggregation rule the run repeats the clean
federation (no attacker) and each attack with the same seeds, and prints the held-out loss
and accuracy reached side by side, with how far each attack moved alpha from the clean run
of the same rule and, per round, how many of the attacker's blocks the rule could outvote
(`zorba_sim.adversary.exposure`: voters are the clients holding a block).

    python benchmarks/poisoning.py --json      # default: 9 federations, ~20 min on 2 idle cores
    python benchmarks/poisoning.py --rounds 8 --max-steps 4 --heldout 400 --json   # longer
    python benchmarks/poisoning.py --rules mean,trimmed_mean:0.2,median --attacks clean,scale

A rule is `mean`, `median`, `trimmed_mean` (the server's default trim fraction) or
`trimmed_mean:F`. docs/results.md quotes the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from zorba_edge.data.examples import ClassificationExample
from zorba_edge.data.movie_reviews import load_movie_reviews
from zorba_edge.data.splits import train_heldout_split
from zorba_edge.model.pretrained import packaged_model_path
from zorba_edge.model.sources import ModelSource, open_source
from zorba_server.config import AggregationConfig, RunConfig, config_from_dict
from zorba_sim.adversary import Adversary, FlipSigns, GuardVeto, ScaleScalars, exposure
from zorba_sim.fleet import GIB, DeviceClass, DeviceGroup, Fleet, fleet_from_counts
from zorba_sim.simulation import Simulation, SimulationConfig

CLEAN = "clean"
ATTACK_NAMES = (CLEAN, "scale", "sign-flip", "guard-veto")
LAPTOP = DeviceClass("laptop-6gib", 6 * GIB, 1.0, 50, 50,
                     source="a laptop's budget, always online, never drops (so the attacker is "
                            "in every round)")


def parse_rule(text: str) -> AggregationConfig:
    method, _, fraction = text.partition(":")
    if fraction:
        if method != "trimmed_mean":
            raise SystemExit(f"rule {text!r}: only trimmed_mean takes a fraction (trimmed_mean:0.2)")
        return AggregationConfig(method=method, trim_fraction=float(fraction))
    return AggregationConfig(method=method)


def rule_name(aggregation: AggregationConfig) -> str:
    if aggregation.method == "trimmed_mean":
        return f"trimmed_mean:{aggregation.trim_fraction:g}"
    return aggregation.method


def make_adversary(attack: str, args: argparse.Namespace) -> Adversary | None:
    if attack == "scale":
        return ScaleScalars(factor=args.scale)
    if attack == "sign-flip":
        return FlipSigns(factor=args.flip_factor)
    if attack == "guard-veto":
        return GuardVeto()
    return None


def run_one(aggregation: AggregationConfig, attack: str, args: argparse.Namespace,
            source: ModelSource, fleet: Fleet, train: list[ClassificationExample],
            heldout: list[ClassificationExample],
            score_base: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """One federation; with `score_base`, the untrained model is scored first (`base`)."""
    server = config_from_dict({"enrolment_secret": "benchmark-secret", "run": {
        "seed": args.seed, "pool_size": 1024, "lr": args.lr, "mu": 1e-3, "batch_size": 8,
        "seq_len": 48, "round_duration_s": 30, "max_steps": args.max_steps,
        "loss_jump_tolerance": args.loss_jump_tolerance},
        "scheduler": {"min_cover": args.min_cover}})
    server = dataclasses.replace(server, aggregation=aggregation)
    started = time.time()
    # eval_every past the last round: only the final round is scored (in _record).
    sim = Simulation.build(SimulationConfig(server, rounds=args.rounds, reference_step_s=2.0,
                                            data_seed=args.seed, eval_every=args.rounds + 1),
                           source, fleet, train, heldout)
    base = sim.evaluate() if score_base else None
    attacker = f"v{args.attacker:06d}"
    adversary = make_adversary(attack, args)
    if adversary is not None:
        sim.adversaries = {attacker: adversary}
    rounds = []
    for _ in range(args.rounds):
        record = sim.run_round()
        plan = sim.engine.last_plan
        seen = exposure(plan, attacker, aggregation) if plan is not None else None
        rounds.append({"round": record.round, "status": record.status,
                       "train_loss": record.train_loss, "reports": record.reports,
                       "attacker_blocks": seen.attacker_blocks if seen else 0,
                       "voters": [seen.voters_min, seen.voters_max] if seen else None,
                       "outvoted_blocks": seen.outvoted_blocks if seen else 0})
        print(json.dumps({"rule": rule_name(aggregation), "attack": attack, **rounds[-1]}),
              file=sys.stderr, flush=True)
    last = sim.records[-1]
    accuracy, loss = ((last.accuracy, last.eval_loss) if last.accuracy is not None
                      else sim.evaluate())
    assert sim.engine.alpha is not None
    alpha = sim.engine.alpha.copy()
    weights = {cid: m.profile.num_samples for cid, m in sim.engine.members.items()}
    result: dict[str, Any] = {
        "rule": rule_name(aggregation), "attack": attack, "accuracy": accuracy, "loss": loss,
        "applied_rounds": sim.engine.version, "lr_factor": sim.engine.lr_factor(),
        "rejected_rounds": sum(1 for h in sim.engine.history if h.status == "rejected"),
        "guard_quarantined": sorted(sim.engine.guard_quarantined()),
        "alpha_l2": float(np.linalg.norm(alpha)), "rounds": rounds,
        "attacker_weight_share": weights[attacker] / sum(weights.values()),
        "wall_s": time.time() - started,
    }
    if base is not None:
        result["base"] = {"accuracy": base[0], "loss": base[1]}
    if adversary is not None:
        result["attacker"] = {"sent": adversary.sent, "refused": adversary.refused,
                              "max_abs_sent": adversary.max_abs_sent}
    del sim
    gc.collect()
    return result, alpha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default="mean,trimmed_mean,median",
                        help="comma-separated: mean, median, trimmed_mean, trimmed_mean:F")
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES),
                        help=f"comma-separated, from {', '.join(ATTACK_NAMES)}")
    parser.add_argument("--scale", type=float, default=100.0, help="the scaling attack's factor")
    parser.add_argument("--flip-factor", type=float, default=1.0,
                        help="the sign-flip attack sends -F x g")
    parser.add_argument("--clients", type=int, default=10, help="virtual devices (with the default fleet)")
    parser.add_argument("--fleet", default=None,
                        help="catalogue counts instead (e.g. pi4-4gb=8,phone-6gb=2): their "
                             "availability and dropout apply, to the attacker too")
    parser.add_argument("--attacker", type=int, default=0, help="index of the malicious client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=1, help="local steps per client a round")
    parser.add_argument("--min-cover", type=int, default=1,
                        help="scheduler.min_cover: clients each block should have")
    parser.add_argument("--lr", type=float, default=RunConfig.lr)
    parser.add_argument("--loss-jump-tolerance", type=float, default=RunConfig.loss_jump_tolerance,
                        help="run.loss_jump_tolerance (0: the loss guard off)")
    parser.add_argument("--seed", type=int, default=0, help="run seed and data seed")
    parser.add_argument("--heldout", type=int, default=100, help="held-out reviews scored")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rules = [parse_rule(r.strip()) for r in args.rules.split(",") if r.strip()]
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = sorted(set(attacks) - set(ATTACK_NAMES))
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}: use {', '.join(ATTACK_NAMES)}")
    fleet = (fleet_from_counts(args.fleet) if args.fleet
             else Fleet((DeviceGroup(LAPTOP, args.clients, 0),)))
    if not 0 <= args.attacker < fleet.size:
        raise SystemExit(f"--attacker {args.attacker}: the fleet has clients 0..{fleet.size - 1}")
    examples = load_movie_reviews()
    train_idx, heldout_idx = train_heldout_split(len(examples), 0.1, 0)
    train = [examples[i] for i in train_idx]
    heldout = [examples[i] for i in heldout_idx][: args.heldout]
    source = open_source(packaged_model_path())
    started = time.time()
    runs: list[dict[str, Any]] = []
    for aggregation in rules:
        clean_alpha = None
        for attack in ([CLEAN] if CLEAN in attacks else []) + [a for a in attacks if a != CLEAN]:
            result, alpha = run_one(aggregation, attack, args, source, fleet, train, heldout,
                                    score_base=not runs)
            if attack == CLEAN:
                clean_alpha = alpha
            elif clean_alpha is not None:
                result["alpha_l2_from_clean"] = float(np.linalg.norm(alpha - clean_alpha))
            runs.append(result)
            print(json.dumps({"result": result}), file=sys.stderr, flush=True)
    base = runs[0].pop("base")
    table = {f"{r['rule']} / {r['attack']}": [round(r["loss"], 4), round(r["accuracy"], 4)]
             for r in runs}
    out = {"command": " ".join(["python", "benchmarks/poisoning.py", *sys.argv[1:]]),
           "settings": {k: v for k, v in vars(args).items() if k != "json"},
           "base": base, "loss_accuracy": table, "runs": runs, "wall_s": time.time() - started}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
