"""What moves a central zeroth-order learner's plateau? One learner, every block, no federation.

Issue 26: central ZO on SmolLM2 (all 30 blocks, one-sided, 4 directions a batch) stalls at about
0.69-0.70 held-out accuracy within a few hundred forward passes, near the bias floor (the base
model with one offset per label fitted on training reviews). The federation cannot beat its
central ceiling, so this measures the levers on the central learner first, at equal forward
passes, with the clients' own estimator and trust region (zorba_edge/engine/zo.py):

    --directions N    directions per batch sharing one unperturbed forward (N + 1 forwards)
    --batch-size B    examples per forward
    --decay D         the step over the run: none, linear (to 10% at the end), cosine (to 0)

and prints one JSON object: held-out accuracy and loss after every --eval-every forwards
(from the base model's), `acc_bias_floor` beside them, the setting and the command.

    python benchmarks/central_plateau.py --json --forwards 300 --eval-examples 200 --threads 1
    python benchmarks/central_plateau.py --json --directions 16 --forwards 300
    python benchmarks/central_plateau.py --json --decay cosine --forwards 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

DECAYS = ("none", "linear", "cosine")


def step_factor(decay: str, spent: float) -> float:
    """The step's multiplier once `spent` (0..1) of the forward budget is used."""
    if decay == "linear":
        return 1.0 - 0.9 * spent
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(spent, 1.0)))
    return 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--model", default=None, help="model path (default: the packaged SmolLM2-135M)")
    p.add_argument("--forwards", type=int, default=300, help="forward passes to spend (default 300)")
    p.add_argument("--directions", type=int, default=4, help="directions per batch (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="default 16 (the issue's central runs)")
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-4, help="the run's default lr (1e-4)")
    p.add_argument("--mu", type=float, default=1e-3)
    p.add_argument("--trust-radius", type=float, default=0.03, help="the run's default (0.03)")
    p.add_argument("--decay", choices=DECAYS, default="none")
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--fit-examples", type=int, default=1024,
                   help="training reviews the bias floor's offsets are fitted on (default 1024)")
    p.add_argument("--eval-every", type=int, default=100, help="forwards between evaluations")
    p.add_argument("--seed", type=int, default=0, help="run seed of the directions")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from zorba_edge.client.assembly import (
        DataChoice,
        footprint_of,
        heldout_examples,
        open_model,
        training_examples,
    )
    from zorba_edge.client.local_task import LocalTask
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE
    from zorba_edge.engine.bias_floor import bias_floor_accuracy, score_examples
    from zorba_edge.engine.fluency import generic_batch, generic_loss
    from zorba_edge.engine.losses import classification_loss, evaluate_classification
    from zorba_edge.engine.zo import ZOConfig, one_sided_estimate, weight_scale
    from zorba_edge.model.loading import LoadConfig, load_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = open_model(args.model)
    choice = DataChoice("movie-reviews", seed=args.data_seed)
    train = training_examples(choice)
    heldout = heldout_examples(DataChoice("movie-reviews", seed=args.data_seed,
                                          max_examples=args.eval_examples))
    tokenizer = source.tokenizer()
    task = LocalTask(train, tokenizer, SENTIMENT_TEMPLATE, seed=args.data_seed)
    eval_batches = list(LocalTask(heldout, tokenizer, SENTIMENT_TEMPLATE).batches(32, args.seq_len))
    every_block = range(footprint_of(source).num_blocks)
    loaded = load_model(source, every_block,
                        LoadConfig(train_dtype="fp32", frozen_dtype="fp32", device="cpu"))
    model = loaded.model.eval()
    blocks = {b: loaded.trainable_parameters(b) for b in every_block}
    max_move = args.trust_radius * weight_scale(blocks) if args.trust_radius > 0 else 0.0
    # Safety figures beside accuracy: next-token loss on the packaged generic text, and the
    # largest block drift sqrt(sum_k alpha_k^2) / rms(theta0_b) (zorba_server/drift.py).
    generic = generic_batch(tokenizer, args.seq_len)
    base_rms = [math.sqrt(sum(float(t.double().square().sum()) for _, t in blocks[b])
                          / sum(t.numel() for _, t in blocks[b])) for b in every_block]
    alpha: dict[int, float] = {}

    def evaluate(spent: int) -> dict[str, Any]:
        result = evaluate_classification(model, eval_batches)
        moved = math.sqrt(sum(a * a for a in alpha.values()))
        point = {"forwards": spent, "accuracy": result.accuracy, "loss": round(result.loss, 4),
                 "generic_loss": round(generic_loss(model, generic), 4),
                 "drift_max": round(moved / min(base_rms), 5),
                 "wall_s": round(time.perf_counter() - started, 1)}
        print(f"[central_plateau] {point}", file=sys.stderr, flush=True)
        return point

    # The bias floor's offsets, fitted on an even sample of the training reviews.
    fit_task = LocalTask(train[:: max(1, len(train) // args.fit_examples)][: args.fit_examples], tokenizer,
                         SENTIMENT_TEMPLATE)
    floor = bias_floor_accuracy(score_examples(model, fit_task.batches(32, args.seq_len)),
                                score_examples(model, eval_batches))
    print(f"[central_plateau] acc_bias_floor {floor:.4f}", file=sys.stderr, flush=True)
    curve = [evaluate(0)]
    spent, next_k, shrunk, batches = 0, 0, 0, 0
    while spent < args.forwards:
        ks = [(next_k + i) % 1024 for i in range(args.directions)]  # the run's pool of 1024 seeds
        next_k += args.directions
        config = ZOConfig(mu=args.mu, lr=args.lr * step_factor(args.decay, spent / args.forwards),
                          max_move=max_move)
        estimate = one_sided_estimate(model, blocks, classification_loss,
                                      task.next_batch(args.batch_size, args.seq_len), args.seed, ks, config)
        spent += estimate.forwards
        batches += 1
        for k, g in estimate.steps:  # theta moved by -(lr / n) g z[k] on every block
            alpha[k] = alpha.get(k, 0.0) + config.lr / len(ks) * g
        shrunk += estimate.shrink < 1.0
        crossed = spent // args.eval_every > (spent - estimate.forwards) // args.eval_every
        if crossed or spent >= args.forwards:
            curve.append(evaluate(spent))
    result = {
        "acc_before": curve[0]["accuracy"],
        "acc_after": curve[-1]["accuracy"],
        "acc_bias_floor": floor,
        "curve": curve,
        "setting": {"directions": args.directions, "batch_size": args.batch_size, "lr": args.lr,
                    "decay": args.decay, "mu": args.mu, "trust_radius": args.trust_radius,
                    "blocks": len(blocks), "estimator": "one_sided"},
        "forwards": spent,
        "batches": batches,
        "trust_shrunk_batches": shrunk,
        "eval_examples": len(heldout),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {args.threads} thread(s)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python benchmarks/central_plateau.py",
                             *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(result, indent=1) if args.json else
          f"{result['acc_before']:.3f} -> {result['acc_after']:.3f} (bias floor {floor:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
