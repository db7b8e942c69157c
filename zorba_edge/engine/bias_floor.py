"""The bias floor: what one offset per label, and nothing else, does for the base model.

A classification run scores each label by its words' log-likelihood after the prompt
(losses.label_scores) and predicts the highest. A base model that favours one label word
(SmolLM2 answers " great" to 98% of reviews) gains many points from a shift of the label
scores alone, which any trained block can learn in a few steps. So every accuracy a run
reports stands beside `acc_bias_floor`: the base model's held-out accuracy once k-1 offsets
between its k label scores are fitted on training examples (the first label's offset is 0).
A gain up to that floor is calibration; above it, the run learned the task.

The offsets maximise the training likelihood of softmax(scores + offsets), a convex problem
in k-1 variables solved by Newton steps in float64 (deterministic, any k). Maximum
likelihood, not training accuracy: it is well posed for any k and does not depend on how
ties between thresholds are broken.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from zorba_edge.data.batches import ClassificationBatch
from zorba_edge.engine.losses import label_scores

FIT_EXAMPLES = 1024
"""Training examples the offsets are fitted on by default (a seeded sample of them): k-1
numbers need few, and scoring them costs a forward pass per batch."""


@dataclass(frozen=True)
class ScoredExamples:
    scores: torch.Tensor
    """(examples, labels) float64 label scores."""
    labels: torch.Tensor
    """(examples,) int64 true labels."""

    def accuracy(self, offsets: torch.Tensor | None = None) -> float:
        shifted = self.scores if offsets is None else self.scores + offsets
        return float((shifted.argmax(dim=-1) == self.labels).double().mean())


@torch.no_grad()
def score_examples(model: nn.Module, batches: Iterable[ClassificationBatch]) -> ScoredExamples:
    """Every example's label scores under `model`, one forward per batch."""
    scores, labels = [], []
    for batch in batches:
        scores.append(label_scores(model, batch).double().cpu())
        labels.append(batch.labels.cpu().long())
    if not scores:
        raise ValueError("no examples to score: the batches were empty")
    return ScoredExamples(torch.cat(scores), torch.cat(labels))


def fit_label_offsets(fit: ScoredExamples, *, iterations: int = 50, ridge: float = 1e-6) -> torch.Tensor:
    """(labels,) offsets, the first 0, maximising the likelihood of `fit`'s labels.

    Newton's method on the mean cross-entropy with a tiny ridge (a label no fit example
    carries would otherwise push its offset to -inf); the Hessian of softmax cross-entropy is
    positive semi-definite, so the steps converge from 0 in a handful of iterations.
    """
    count, labels = fit.scores.shape
    free = torch.zeros(labels - 1, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(fit.labels, labels).double()[:, 1:]
    for _ in range(iterations):
        offsets = torch.cat([free.new_zeros(1), free])
        probs = (fit.scores + offsets).softmax(dim=-1)[:, 1:]
        grad = (probs - onehot).mean(dim=0) + ridge * free
        hess = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]).mean(dim=0)
        hess = hess + ridge * torch.eye(labels - 1, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        free = free - step
        if float(step.abs().max()) < 1e-10:
            break
    return torch.cat([free.new_zeros(1), free])


def bias_floor_accuracy(fit: ScoredExamples, heldout: ScoredExamples) -> float:
    """Held-out accuracy of the scores shifted by the offsets fitted on `fit`."""
    return heldout.accuracy(fit_label_offsets(fit))
