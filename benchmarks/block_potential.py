"""Is a block's potential a stable property of the model and task, and how unequal is it?

For every block b of the simulator's model (SmolLM2-135M-Instruct by default, loaded as the
simulator loads it: every block fp32) on movie reviews (the simulator's training split and
template), measures E[g_b^2] and E[z_b^T H_b z_b] from antithetic triples (L+, L0, L-) along
Rademacher directions on block b alone (zorba_lab/block_potential.py has the formulas), on
two disjoint sets of training batches A and B, and prints one JSON object:

    blocks            one entry per block: e_g2, e_zhz and their bootstrap 90% intervals
                      (both sets pooled), potential = e_g2 / e_zhz where the curvature's
                      interval is above 0, and the same per set under `sets`
    rank_agreement    Spearman correlation between sets A and B of the blocks' potential when
                      every block's curvature is measured positive in both sets, else of e_g2
                      (`rank_agreement_of` says which; both are given where defined)
    inequality        largest / smallest e_g2, and the share of the largest block
    exact_g2_every_block  every block's autograd |grad_b|^2 per set (what E_z[g_b^2] is,
                      without the directions' noise), its rank agreement between the sets,
                      and `signal_fraction`: the share of it that is the task's gradient
                      rather than the batch's noise

Directions are taken round-robin (one per block and set in turn), so a run stopped by
--max-minutes still has the same number of directions on every block. A triple costs two
forwards; L0 one per batch, shared by every block.

    python benchmarks/block_potential.py --json --directions 16 --threads 1
    python benchmarks/block_potential.py --json --directions 64 --batches 8 --max-minutes 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from zorba_lab.block_potential import BlockPotential, spearman


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--model", default=None, help="model path (default: the packaged SmolLM2-135M)")
    p.add_argument("--directions", type=int, default=16,
                   help="directions per block and per batch set (default %(default)s)")
    p.add_argument("--batches", type=int, default=4, help="batches per set (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=48, help="the simulator's default (48)")
    p.add_argument("--mu", type=float, default=1e-3, help="the run's default mu (1e-3)")
    p.add_argument("--blocks", type=int, nargs="*", default=None, help="default: every block")
    p.add_argument("--seed", type=int, default=0, help="run seed of the directions")
    p.add_argument("--data-seed", type=int, default=0, help="data split and batch order")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop taking directions after this long (every block keeps the same count)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from zorba_edge.client.assembly import DataChoice, footprint_of, open_model, training_examples
    from zorba_edge.client.local_task import LocalTask
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE
    from zorba_edge.engine.losses import classification_loss
    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_lab.block_potential import Triple, gradient_signal, measure_triples, summarise

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = open_model(args.model)
    train = training_examples(DataChoice("movie-reviews", seed=args.data_seed))
    task = LocalTask(train, source.tokenizer(), SENTIMENT_TEMPLATE, seed=args.data_seed)
    # Consecutive batches of one epoch-wise shuffled stream: the two sets share no review.
    drawn = [task.next_batch(args.batch_size, args.seq_len) for _ in range(2 * args.batches)]
    sets = {"A": drawn[: args.batches], "B": drawn[args.batches:]}
    every_block = list(range(footprint_of(source).num_blocks))
    fp32 = LoadConfig(train_dtype="fp32", frozen_dtype="fp32", device="cpu")
    loaded = load_model(source, every_block, fp32)
    model = loaded.model.eval()
    blocks = args.blocks if args.blocks is not None else every_block
    load_s = time.perf_counter() - started
    with torch.no_grad():
        zero = {name: [float(classification_loss(model, b)) for b in batches]
                for name, batches in sets.items()}
    # The noise-free reference, every block from one backward per batch: E_z[g_b^2] on a
    # batch is |grad_b|^2 there; the batches' mean gradient says how much of it is signal.
    tensors_of = {b: loaded.trainable_parameters(b) for b in every_block}
    signal = {name: gradient_signal(model, tensors_of, classification_loss, batches)
              for name, batches in sets.items()}
    exact_g2 = {name: s.mean_batch_g2 for name, s in signal.items()}
    measure_started = time.perf_counter()
    spent_before = 2 * args.batches
    triples: dict[str, dict[int, list[Triple]]] = {name: {b: [] for b in blocks} for name in sets}
    deadline = None if args.max_minutes is None else started + 60 * args.max_minutes
    forwards = 2 * args.batches
    for i in range(args.directions):
        if deadline is not None and time.perf_counter() > deadline:
            print(f"[block_potential] --max-minutes reached after {i} directions per block and set",
                  file=sys.stderr, flush=True)
            break
        for offset, (name, batches) in enumerate(sets.items()):
            # k distinct per set; the same k on two blocks is two independent directions.
            k = offset * args.directions + i
            for b in blocks:
                # Direction i of every block uses batch i mod m: blocks are compared on the same batches.
                j = i % len(batches)
                one = measure_triples(model, b, tensors_of[b], classification_loss, [batches[j]],
                                      [zero[name][j]], args.seed, [k], args.mu)
                triples[name][b].extend(one)
                forwards += 2
        print(f"[block_potential] direction {i + 1}/{args.directions} on {len(blocks)} blocks x 2 sets, "
              f"{forwards} forwards, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    rng = np.random.default_rng(args.seed)
    per_set = {name: {b: summarise(b, ts, args.mu, rng) for b, ts in by_block.items()}
               for name, by_block in triples.items()}
    pooled = {b: summarise(b, triples["A"][b] + triples["B"][b], args.mu, rng) for b in blocks}
    result = report(blocks, per_set, pooled, exact_g2)
    result["exact_g2_every_block"] = {
        "A": [exact_g2["A"][b] for b in every_block], "B": [exact_g2["B"][b] for b in every_block],
        "rank_agreement": spearman([exact_g2["A"][b] for b in every_block],
                                   [exact_g2["B"][b] for b in every_block]),
        "max_over_min": max(exact_g2["A"].values()) / min(exact_g2["A"].values()),
        # How much of a batch's gradient is the task's: |mu_b|^2 / mean_j |grad_b,j|^2, per set
        # (the rest is minibatch noise, which no number of directions removes).
        "signal_fraction": {name: [round(s.fraction(b), 4) for b in every_block]
                            for name, s in signal.items()},
        "signal_g2": {name: [s.signal_g2[b] for b in every_block] for name, s in signal.items()},
    }
    result.update({
        "directions_per_block_and_set": len(triples["A"][blocks[0]]),
        "forwards": forwards,
        "load_s": round(load_s, 1),
        "seconds_per_triple_forward": round((time.perf_counter() - measure_started)
                                            / max(forwards - spent_before, 1), 3),
        "wall_s": round(time.perf_counter() - started, 1),
        "model": Path(str(getattr(source, "path", "SmolLM2-135M-Instruct"))).name,
        "batch": f"{args.batches} batches x {args.batch_size} reviews x <= {args.seq_len} tokens per set",
        "mu": args.mu,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {args.threads} thread(s), "
                   f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python benchmarks/block_potential.py",
                             *(argv if argv is not None else sys.argv[1:])]),
    })
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for entry in result["blocks"]:
            print(f"block {entry['block']:>2}: E[g^2] {entry['e_g2']:10.4g} {entry['e_g2_ci90']}  "
                  f"E[zHz] {entry['e_zhz']:10.4g} {entry['e_zhz_ci90']}")
        print(f"rank agreement ({result['rank_agreement_of']}): {result['rank_agreement']:.3f}")
    return 0


def report(blocks: list[int], per_set: dict[str, dict[int, BlockPotential]],
           pooled: dict[int, BlockPotential], exact_g2: dict[str, dict[int, float]]) -> dict[str, Any]:
    """The JSON's figures from the per-set and pooled block estimates, and the autograd
    reference |grad_b|^2 averaged over each set's batches."""
    a, b = per_set["A"], per_set["B"]
    agree_g2 = spearman([a[x].e_g2.mean for x in blocks], [b[x].e_g2.mean for x in blocks])
    curvature_resolved = all(s[x].potential is not None for s in (a, b) for x in blocks)
    agree_potential = (spearman([a[x].potential for x in blocks], [b[x].potential for x in blocks])
                       if curvature_resolved else None)
    g2 = [pooled[x].e_g2.mean for x in blocks]
    entries = []
    for x in blocks:
        entry = pooled[x].as_dict()
        entry["exact_g2"] = float(np.mean([exact_g2[name][x] for name in per_set]))
        entry["sets"] = {name: {k: v for k, v in s[x].as_dict().items() if k not in ("block", "directions")}
                         | {"exact_g2": exact_g2[name][x]} for name, s in per_set.items()}
        entries.append(entry)
    return {
        "blocks": entries,
        "rank_agreement": agree_potential if agree_potential is not None else agree_g2,
        "rank_agreement_of": "potential" if agree_potential is not None else
        "e_g2 (a block's curvature interval reaches 0 or below in a set: too noisy to rank by)",
        "rank_agreement_e_g2": agree_g2,
        "rank_agreement_potential": agree_potential,
        # The same agreement without the directions' noise: what the batches alone change.
        "rank_agreement_exact_g2": spearman([exact_g2["A"][x] for x in blocks],
                                            [exact_g2["B"][x] for x in blocks]),
        "blocks_with_curvature_measured_positive": sum(pooled[x].potential is not None for x in blocks),
        "inequality": {"e_g2_max_over_min": max(g2) / min(g2) if min(g2) > 0 else None,
                       "e_g2_top_block": blocks[int(max(range(len(g2)), key=g2.__getitem__))],
                       "e_g2_top_block_share": max(g2) / sum(g2)},
    }


if __name__ == "__main__":
    sys.exit(main())
