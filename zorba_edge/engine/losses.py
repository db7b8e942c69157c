"""The losses a client minimises: label-word classification and completion-only LM loss.

Both take a plain causal LM (`model(input_ids=..., attention_mask=...).logits`, the
transformers convention) and a padded batch, and return a scalar fp32 tensor, the mean over
examples. They need no autograd (the zeroth-order engine runs them under no_grad or
inference_mode) but stay differentiable, so tests can compare against autograd gradients.
Only the positions that carry a target are gathered before the softmax, so whatever the
model computes at padding (even NaN) never reaches the loss; classification computes the LM
head only at those positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zorba_edge.data.batches import IGNORE_INDEX, ClassificationBatch, LMBatch
from zorba_edge.model.readout import HeadCall, LabelReadout, capped


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
    classification that is a few positions instead of all 64, which saves most of the head's
    compute and the logits' memory (100 MB for SmolLM2 at 8 x 64).
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


def logits_at(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """(batch, k, vocab) logits of row i at `positions[i]` ((batch, k) sequence positions).

    The LM head runs only at the distinct positions any row needs (logits_to_keep) where the
    model takes it: with Gemma 3's 262k-token vocabulary the head at every position would cost
    more than the blocks.
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    if _accepts_logits_to_keep(model):
        kept, column = torch.unique(positions.flatten(), sorted=True, return_inverse=True)
        logits = forward_logits(model, input_ids, attention_mask, kept.to(input_ids.device))
        return logits[rows.to(logits.device), column.view_as(positions).to(logits.device)]
    logits = forward_logits(model, input_ids, attention_mask)
    return logits[rows.to(logits.device), positions.to(logits.device)]


def _continuation_log_likelihood(model: nn.Module, batch: ClassificationBatch,
                                 tokens: torch.Tensor) -> torch.Tensor:
    """(batch,) summed log-probability of `tokens` following each row's prompt.

    Each row becomes its prompt's real tokens, then all but the last of `tokens` (the last is
    only predicted), right-padded to the batch's seq_len: the batch shape, and so the memory,
    stays the run's. The collator keeps that room.
    """
    size, seq_len = batch.input_ids.shape
    count = tokens.shape[0]
    mask = batch.attention_mask.bool()
    lengths = mask.sum(dim=1)
    if int(lengths.max()) + count - 1 > seq_len:
        raise ValueError(
            f"a prompt of {int(lengths.max())} tokens leaves no room for a {count}-token label "
            f"word in seq_len={seq_len}; collate with the task's ClassificationCollator")
    ids = torch.full_like(batch.input_ids, int(tokens[0]))
    attention = torch.zeros_like(batch.attention_mask)
    for row in range(size):
        sequence = torch.cat([batch.input_ids[row][mask[row]], tokens[:-1]])
        ids[row, : len(sequence)] = sequence
        attention[row, : len(sequence)] = 1
    positions = (lengths - 1)[:, None] + torch.arange(count, device=lengths.device)
    log_probs = logits_at(model, ids, attention, positions).float().log_softmax(dim=-1)
    targets = tokens.to(log_probs.device)[None, :, None].expand(size, count, 1)
    return log_probs.gather(-1, targets).squeeze(-1).sum(dim=1)


def label_scores(model: nn.Module, batch: ClassificationBatch) -> torch.Tensor:
    """(batch, num_labels) fp32 log-likelihood of each label word's full continuation.

    A label's score is the sum of its tokens' log-probabilities after the prompt, as
    lm-eval-harness scores multiple-choice answers (its `acc`), not divided by the length:
    the softmax over these scores is then exactly the model's distribution restricted to the
    candidate strings, and a one-token label scores the same as by its next-token
    probability. (Length normalisation, lm-eval's `acc_norm`, would favour longer words by
    an amount that depends on the tokenizer.) When every label word is one token, one forward
    pass scores them all; otherwise one forward per label, each of the batch's own shape.
    """
    lengths = batch.label_lengths.tolist()
    if max(lengths) == 1:
        last = last_token_positions(batch.attention_mask)[:, None]
        log_probs = logits_at(model, batch.input_ids, batch.attention_mask, last)[:, 0]
        words = batch.label_tokens[:, 0].to(log_probs.device)
        return log_probs.float().log_softmax(dim=-1)[:, words]
    last_token_positions(batch.attention_mask)  # refuses empty rows with a clear message
    return torch.stack(
        [_continuation_log_likelihood(model, batch, batch.label_tokens[label, :length])
         for label, length in enumerate(lengths)], dim=1)


def classification_loss(model: nn.Module, batch: ClassificationBatch) -> torch.Tensor:
    """Cross-entropy over the labels' scores (MeZO's candidate scoring, words of any length)."""
    scores = label_scores(model, batch)
    return F.cross_entropy(scores, batch.labels.to(scores.device))


def cached_label_scores(calls: Sequence[HeadCall], readout: LabelReadout,
                        batch: ClassificationBatch) -> torch.Tensor:
    """`label_scores` of the model as recorded in `calls` (the head calls of one
    `classification_loss`, `LabelReadout.recording`) with its label rows replaced by `readout`'s
    current rows, without a forward: the label logits are h @ rows.T, the normaliser
    logaddexp(the other columns' logsumexp, the label logits' logsumexp), and each label's score
    the sum of its tokens' log-probabilities, gathered at the positions `label_scores` reads."""
    lengths = batch.label_lengths.tolist()
    seq_len = batch.input_ids.shape[1]
    if len(calls) != (1 if max(lengths) == 1 else len(lengths)):
        raise ValueError(f"{len(calls)} recorded head calls for labels of lengths {lengths}: record "
                         "exactly one classification_loss of this batch")
    if max(lengths) == 1:
        last = last_token_positions(batch.attention_mask)[:, None]
        log_probs = _cached_log_probs(calls[0], last, seq_len, readout)[:, 0]
        return log_probs[:, _rows_of(readout, batch.label_tokens[:, 0])]
    # As _continuation_log_likelihood: each row's prompt, then the label's tokens after it.
    starts = batch.attention_mask.bool().sum(dim=1) - 1
    scores = []
    for label, length in enumerate(lengths):
        positions = starts[:, None] + torch.arange(length, device=starts.device)
        log_probs = _cached_log_probs(calls[label], positions, seq_len, readout)
        index = _rows_of(readout, batch.label_tokens[label, :length])
        scores.append(log_probs.gather(-1, index[None, :, None].expand(len(batch), length, 1))
                      .squeeze(-1).sum(dim=1))
    return torch.stack(scores, dim=1)


def cached_classification_loss(calls: Sequence[HeadCall], readout: LabelReadout,
                               batch: ClassificationBatch) -> torch.Tensor:
    """`classification_loss` from recorded head calls and the readout's current rows."""
    scores = cached_label_scores(calls, readout, batch)
    return F.cross_entropy(scores, batch.labels.to(scores.device))


def _cached_log_probs(call: HeadCall, positions: torch.Tensor, seq_len: int,
                      readout: LabelReadout) -> torch.Tensor:
    """(batch, k, labels' tokens) log-probabilities at `positions` ((batch, k)) of one head call.

    The head ran at every position (seq_len of them) or at the distinct positions the batch
    needed (`logits_at`'s logits_to_keep, sorted): the same selection as `logits_at`."""
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
    if call.hidden.shape[1] == seq_len:
        index = positions
    else:
        _, column = torch.unique(positions.flatten(), sorted=True, return_inverse=True)
        index = column.view_as(positions)
    hidden, lse_other = call.hidden[rows, index], call.lse_other[rows, index]
    label_logits = capped(hidden @ readout.rows.T, readout.softcap)
    normaliser = torch.logaddexp(lse_other, label_logits.logsumexp(dim=-1))
    return label_logits - normaliser[..., None]


def _rows_of(readout: LabelReadout, tokens: torch.Tensor) -> torch.Tensor:
    """The readout's row of each token of `tokens` (its rows are in sorted token order)."""
    ids = readout.token_ids
    index = torch.searchsorted(ids, tokens.to(ids.device))
    if bool((index >= len(ids)).any()) or bool((ids[index.clamp(max=len(ids) - 1)] != tokens).any()):
        raise ValueError(f"label tokens {tokens.tolist()} are not all rows of the readout "
                         f"({ids.tolist()})")
    return index


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
        scores = label_scores(model, batch)
        labels = batch.labels.to(scores.device)
        loss_sum += float(F.cross_entropy(scores, labels, reduction="sum"))
        correct += int((scores.argmax(dim=-1) == labels).sum())
        examples += len(batch)
    if examples == 0:
        raise ValueError("no examples to evaluate: the batches were empty")
    return ClassificationEval(loss=loss_sum / examples, accuracy=correct / examples,
                              examples=examples)


def accuracy(model: nn.Module, batches: Iterable[ClassificationBatch]) -> float:
    """Fraction of examples whose highest-scoring label is the right one."""
    return evaluate_classification(model, batches).accuracy


def lm_loss(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (completion) tokens only.

    Each example's loss is the mean over its own target tokens, and the batch loss the mean
    over examples, so a long completion does not outweigh a short one. Rows without any
    target (a completion truncated away) are left out of the mean.
    """
    return lm_row_losses(model, batch).mean()


def lm_row_losses(model: nn.Module, batch: LMBatch) -> torch.Tensor:
    """Each row's mean next-token cross-entropy over its target tokens (rows without one left
    out), from one forward pass.

    The softmax is taken one row at a time, on the row's logits as they are: the forward's
    logits are the one full-size tensor it holds, as the memory model's activation term
    counts (zorba_common/memory_model.py). Gathering every target's logits first and taking
    their log-softmax held two more copies of them; on the fluency watch's 7 rows of SmolLM2
    that was ~130 MiB the model did not count, the ~8% by which a CPU client's peak stood
    above it (docs/design.md §4)."""
    logits = forward_logits(model, batch.input_ids, batch.attention_mask)
    # Position t predicts token t + 1: drop the last prediction and the first label.
    targets = batch.labels[:, 1:].to(logits.device)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if int(counts.sum()) == 0:
        raise ValueError(
            "the batch has no target tokens (every label is ignored); check that completions "
            "survive truncation to seq_len"
        )
    rows = [
        F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=IGNORE_INDEX,
                        reduction="sum") / counts[row]
        for row in range(logits.shape[0]) if int(counts[row]) > 0
    ]
    return torch.stack(rows)
