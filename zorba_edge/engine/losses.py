"""The losses a client minimises: label-word classification and completion-only LM loss.

Both take a plain causal LM (`model(input_ids=..., attention_mask=...).logits`, the
transformers convention) and a padded batch, and return a scalar fp32 tensor, the mean over
examples. They need no autograd (the zeroth-order engine runs them under no_grad or
inference_mode) but stay differentiable, so tests can compare against autograd gradients.
Only the positions that carry a target are gathered before the softmax, so whatever the
model computes at padding (even NaN) never reaches the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zorba_edge.data.batches import IGNORE_INDEX, ClassificationBatch, LMBatch


def _has_left_padding(attention_mask: torch.Tensor) -> bool:
    """True when some row has padding before a real token."""
    return bool((attention_mask[:, :-1] < attention_mask[:, 1:]).any())


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def forward_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    keep_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, seq_len, vocab) logits; position ids count real tokens under left padding.

    transformers numbers positions 0..seq_len-1 when not told otherwise, which shifts every
    left-padded row's positions by its padding; passing them makes left and right padding give
    the same logits. Right-padded batches need only input_ids and attention_mask, so any
    module with that signature works.

    With `keep_positions` (sorted sequence positions), models that take `logits_to_keep`
    compute the LM head at those positions only: (batch, len(keep_positions), vocab). For
    classification that is one position per distinct prompt length instead of all 64, which
    saves most of the head's compute and the logits' memory (100 MB for SmolLM2 at 8 x 64).
    """
    kwargs: dict[str, torch.Tensor] = {}
    if _has_left_padding(attention_mask):
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if keep_positions is not None:
        kwargs["logits_to_keep"] = keep_positions
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) index of each row's last real token, for left or right padding."""
    if not bool(attention_mask.any(dim=-1).all()):
        empty = (~attention_mask.bool().any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"batch rows {empty} have no real tokens (attention_mask all zero)")
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.bool()).max(dim=-1).values


def label_word_logits(model: nn.Module, batch: ClassificationBatch) -> torch.Tensor:
    """(batch, num_labels) fp32 logits of each label word as the token after the prompt."""
    last = last_token_positions(batch.attention_mask)
    if _accepts_logits_to_keep(model):
        kept, column = torch.unique(last, sorted=True, return_inverse=True)
        logits = forward_logits(model, batch.input_ids, batch.attention_mask, kept.to(batch.input_ids.device))
    else:
        logits, column = forward_logits(model, batch.input_ids, batch.attention_mask), last
    rows = torch.arange(logits.shape[0], device=logits.device)
    next_token = logits[rows, column.to(logits.device)]
    return next_token[:, batch.label_word_ids.to(logits.device)].float()


def classification_loss(model: nn.Module, batch: ClassificationBatch) -> torch.Tensor:
    """Cross-entropy over the label words' logits (MeZO's candidate scoring, one token each).

    Equal to cross-entropy over the label words' log-probabilities under the full vocabulary
    softmax: the log-normaliser is shared by the candidates and cancels.
    """
    scores = label_word_logits(model, batch)
    return F.cross_entropy(scores, batch.labels.to(scores.device))


@dataclass(frozen=True)
class ClassificationEval:
    loss: float
    """Mean cross-entropy per example."""
    accuracy: float
    examples: int


@torch.no_grad()
def evaluate_classification(
    model: nn.Module, batches: Iterable[ClassificationBatch]
) -> ClassificationEval:
    """Loss and accuracy over all batches, from one forward pass each."""
    loss_sum, correct, examples = 0.0, 0, 0
    for batch in batches:
        scores = label_word_logits(model, batch)
        labels = batch.labels.to(scores.device)
        loss_sum += float(F.cross_entropy(scores, labels, reduction="sum"))
        correct += int((scores.argmax(dim=-1) == labels).sum())
        examples += len(batch)
    if examples == 0:
        raise ValueError("no examples to evaluate: the batches were empty")
    return ClassificationEval(loss=loss_sum / examples, accuracy=correct / examples,
                              examples=examples)


def accuracy(model: nn.Module, batches: Iterable[ClassificationBatch]) -> float:
    """Fraction of examples whose highest-scoring label word is the right one."""
    return evaluate_classification(model, batches).accuracy


def lm_loss(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (completion) tokens only.

    Each example's loss is the mean over its own target tokens, and the batch loss the mean
    over examples, so a long completion does not outweigh a short one. Rows without any
    target (a completion truncated away) are left out of the mean.
    """
    logits = forward_logits(model, batch.input_ids, batch.attention_mask)
    # Position t predicts token t + 1: drop the last prediction and the first label.
    targets = batch.labels[:, 1:].to(logits.device)
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError(
            "the batch has no target tokens (every label is ignored); check that completions "
            "survive truncation to seq_len"
        )
    token_loss = F.cross_entropy(
        logits[:, :-1][rows, cols].float(), targets[rows, cols], reduction="none"
    )
    size = logits.shape[0]
    per_row = torch.zeros(size, dtype=torch.float32, device=logits.device)
    per_row = per_row.index_add(0, rows, token_loss)
    counts = torch.bincount(rows, minlength=size)
    present = counts > 0
    return (per_row[present] / counts[present]).mean()
