"""Gradient accuracy per forward pass of the ZO estimators, on SmolLM2-135M-Instruct.

On one batch of 8 movie reviews (64 tokens, the classification loss the clients train on) it
computes the autograd gradient over the assigned blocks, then runs each estimator of
`zorba_edge.engine.zo` with lr = 0 (estimation only, theta unchanged up to the
perturbations' roundings) in calls of n directions, and after every call reports the cosine
between the running ZO estimate, the mean over directions of g_i z_i, and the autograd
gradient, against the forward passes spent so far:

    antithetic   2n forwards per call, g = (L(+mu z) - L(-mu z)) / 2 mu
    one_sided    n+1 forwards per call, g = (L(+mu z) - L(theta)) / mu
    normalised   one_sided divided by the spread of the n differences (FZOO): the same
                 direction up to a positive scale per call, so its cosine differs from
                 one_sided's only by how calls are weighted

Each g_i is also compared with the exact directional derivative z_i . grad (from autograd):
`projected_grad_rel_rms_err` = |g - z.grad| / |z.grad| over all directions spent, and their
correlation. That is where mu shows: too small and fp32 rounding of the loss dominates, too
large and curvature does (the normalised estimator's g is rescaled by sigma / mu for this, so
it equals one_sided's by construction; it differs only in the step's size).

For d assigned parameters and N directions, an unbiased estimate from exact directional
derivatives has cosine ~ 1 / sqrt(1 + d / N) ~ sqrt(N / d) (0.002 for N = 16 over one 3.5M
block): the figure is small by nature; compare estimators and mu against each other and
against the noise floor 1 / sqrt(d) of a random direction.

    python benchmarks/estimators.py --json
    python benchmarks/estimators.py --json --forwards 64 --mus 1e-4 1e-3 1e-2 --blocks 15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory or .gguf (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[15],
                        help="assigned blocks (default 15)")
    parser.add_argument("--mus", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--directions", type=int, default=4,
                        help="directions n per estimator call (default 4)")
    parser.add_argument("--forwards", type=int, default=24,
                        help="forward passes to spend per estimator and mu (default 24)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from zorba_edge.data.collate import ClassificationCollator
    from zorba_edge.data.movie_reviews import load_movie_reviews
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE
    from zorba_edge.engine.directions import Direction
    from zorba_edge.engine.losses import classification_loss
    from zorba_edge.engine.zo import ZOConfig, antithetic_estimate, one_sided_estimate
    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_edge.model.pretrained import packaged_model_path
    from zorba_edge.model.sources import open_source

    source = open_source(args.model or packaged_model_path())
    reviews = load_movie_reviews()
    rng = np.random.default_rng(args.seed)
    chosen = [reviews[i] for i in rng.choice(len(reviews), 8, replace=False)]
    batch = ClassificationCollator(source.tokenizer(), SENTIMENT_TEMPLATE, seq_len=64)(chosen)
    loaded = load_model(source, args.blocks, LoadConfig(frozen_dtype="fp32"))
    model = loaded.model.eval()
    blocks = {b: loaded.trainable_parameters(b) for b in args.blocks}
    params = [p for b in args.blocks for _, p in sorted(blocks[b], key=lambda item: item[0])]

    for p in params:
        p.requires_grad_(True)
    classification_loss(model, batch).backward()
    grad = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    dim = grad.numel()
    print(f"[estimators] d = {dim}, |grad| = {grad.norm():.4g}", file=sys.stderr, flush=True)

    def directional_derivative(k: int) -> float:
        """z[k] . grad over the assigned blocks, the exact value each g estimates."""
        z = {b: [(n, torch.zeros_like(p)) for n, p in tensors] for b, tensors in blocks.items()}
        Direction(z, args.seed, k).add_(1.0)
        flat_z = [t for b in args.blocks for _, t in sorted(z[b], key=lambda item: item[0])]
        return torch.cat([t.flatten() for t in flat_z]).double().dot(grad.double()).item()

    estimators = {
        "antithetic": antithetic_estimate,
        "one_sided": one_sided_estimate,
        "normalised": lambda *a: one_sided_estimate(*a, normalise=True),
    }
    curves, next_k = {}, 0
    for name, estimate in estimators.items():
        for mu in args.mus:
            # The running sum of g_i z_i, laid out like the blocks so a Direction can add to it.
            total = {b: [(n, torch.zeros_like(p)) for n, p in tensors] for b, tensors in blocks.items()}
            flat = [t for b in args.blocks for _, t in sorted(total[b], key=lambda item: item[0])]
            spent, directions, points, exact, measured = 0, 0, [], [], []
            t0 = time.perf_counter()
            while spent < args.forwards:
                ks = list(range(next_k, next_k + args.directions))
                next_k += args.directions  # fresh directions for every run: no shared luck
                result = estimate(model, blocks, classification_loss, batch, args.seed, ks,
                                  ZOConfig(mu=mu, lr=0.0))
                for k, g in result.steps:
                    Direction(total, args.seed, k).add_(g)
                    exact.append(directional_derivative(k))
                    # In derivative units: the normalised g times sigma / mu is one-sided's g.
                    measured.append(g * (result.spread or mu) / mu if result.spread is not None else g)
                spent += result.forwards
                directions += len(ks)
                vector = torch.cat([t.flatten() for t in flat])
                cosine = torch.nn.functional.cosine_similarity(vector, grad, dim=0).item()
                points.append({"forwards": spent, "directions": directions,
                               "cosine": round(cosine, 5)})
            e, m = torch.tensor(exact, dtype=torch.float64), torch.tensor(measured, dtype=torch.float64)
            curves[f"{name}@mu={mu:g}"] = {
                "estimator": name, "mu": mu, "points": points,
                "projected_grad_rel_rms_err": round(((m - e).norm() / e.norm()).item(), 5),
                "projected_grad_corr": round(torch.corrcoef(torch.stack([m, e]))[0, 1].item(), 5),
                "seconds_per_forward": round((time.perf_counter() - t0) / spent, 3),
            }
            print(f"[estimators] {name} mu={mu:g}: {points[-1]}, g rel err "
                  f"{curves[f'{name}@mu={mu:g}']['projected_grad_rel_rms_err']}", file=sys.stderr, flush=True)

    summary = {
        "model": Path(source.path).name if hasattr(source, "path") else "SmolLM2-135M-Instruct",
        "blocks": args.blocks,
        "dimension": dim,
        "grad_norm": round(grad.norm().item(), 5),
        "random_direction_cosine_std": round(1 / math.sqrt(dim), 6),
        "directions_per_call": args.directions,
        "batch": "8x64 movie reviews, classification loss",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "curves": curves,
        "command": " ".join(["python", "benchmarks/estimators.py", *sys.argv[1:]]),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, curve in curves.items():
            last = curve["points"][-1]
            print(f"{key:>24}: cosine {last['cosine']:+.5f} after {last['forwards']} forwards "
                  f"({last['directions']} directions)")


if __name__ == "__main__":
    main()
