"""A first-order ceiling for the quickstart's task: a linear readout of SmolLM2's features.

Logistic regression (L-BFGS, L2 penalty) on the final hidden state at the prompt's last token,
the vector the label words' rows of the LM head read, for movie reviews rendered with the
quickstart's template; trained on a seeded subset of the training split, scored on the first
held-out reviews (the split the quickstart evaluates on). It changes no weight of the model: it
says how far a perfectly trained readout of the pretrained features gets, which bounds what
moving only the label words' head rows could give and puts the zeroth-order runs' accuracy in
scale (docs/learning.md, "End to end").

    python benchmarks/linear_probe.py --json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from zorba_edge.data.collate import ClassificationCollator
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.data.movie_reviews import load_movie_reviews
from zorba_edge.data.splits import train_heldout_split
from zorba_edge.data.templates import SENTIMENT_TEMPLATE
from zorba_edge.engine.losses import last_token_positions
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.pretrained import packaged_model_path
from zorba_edge.model.sources import open_source

PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)


def last_token_features(model: torch.nn.Module, collator: ClassificationCollator,
                        examples: Sequence[ClassificationExample],
                        batch_size: int = 16) -> np.ndarray:
    """(len(examples), hidden) final hidden state at each prompt's last real token, the
    position the label words are scored at: the same rendering, truncation and padding as
    training (the task's collator)."""
    rows = []
    started = time.time()
    for i in range(0, len(examples), batch_size):
        batch = collator(examples[i:i + batch_size])
        with torch.no_grad():
            hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           output_hidden_states=True).hidden_states[-1]
        last = last_token_positions(batch.attention_mask)
        rows.append(hidden[torch.arange(hidden.shape[0]), last].float().numpy())
        if (i // batch_size) % 20 == 0:
            print(f"[{time.time() - started:6.0f} s] features {i}/{len(examples)}",
                  file=sys.stderr, flush=True)
    return np.concatenate(rows)


def fit_logistic(x: torch.Tensor, y: torch.Tensor,
                 penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(1, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss = loss + penalty * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1500, help="training reviews (default 1500)")
    parser.add_argument("--heldout", type=int, default=500, help="held-out reviews (default 500)")
    parser.add_argument("--seq-len", type=int, default=48, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="split and subset seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    examples = load_movie_reviews()
    train_idx, heldout_idx = train_heldout_split(len(examples), 0.1, args.seed)
    train_idx = np.random.default_rng(args.seed).permutation(train_idx)[: args.train]
    heldout_idx = list(heldout_idx)[: args.heldout]
    source = open_source(packaged_model_path())
    model = load_model(source, range(0), LoadConfig(frozen_dtype="fp32")).model
    collator = ClassificationCollator(source.tokenizer(), SENTIMENT_TEMPLATE, args.seq_len)

    def features(indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        chosen = [examples[i] for i in indices]
        return (last_token_features(model, collator, chosen),
                np.array([e.label for e in chosen]))

    x_train, y_train = features(train_idx)
    x_heldout, y_heldout = features(heldout_idx)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b_ = torch.tensor((x_train - mean) / std), torch.tensor((x_heldout - mean) / std)
    ya, yb = torch.tensor(y_train).double(), torch.tensor(y_heldout).double()
    fits = []
    for penalty in PENALTIES:
        w, b = fit_logistic(a, ya, penalty)
        fits.append({"l2": penalty,
                     "train_accuracy": float(((a @ w + b > 0).double() == ya).double().mean()),
                     "heldout_accuracy": float(((b_ @ w + b > 0).double() == yb).double().mean())})
    result = {"train_examples": len(train_idx), "heldout_examples": len(heldout_idx),
              "fits": fits, "best_heldout_accuracy": max(f["heldout_accuracy"] for f in fits),
              "command": " ".join(["python benchmarks/linear_probe.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
