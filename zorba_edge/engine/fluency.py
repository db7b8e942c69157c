"""Is the model still a language model? Its next-token loss on generic text (the watch).

Fine-tuning on a classification task moves the label scores; it should leave the model's
plain next-token predictions about where the base model has them. A run whose blocks drift far
from their base weights breaks generation without the task's loss saying so (issue 26: Gemma 3
generated garbage while its held-out task loss had risen only 16%). The watch measures the
mean next-token cross-entropy over the packaged generic text (zorba_edge/data/generic_text.py,
every token a target); zorba_common.fluency.broken calls the model broken once it stands more
than a tolerance above the base model's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from zorba_edge.data.batches import LMBatch
from zorba_edge.data.collate import special_prefix_ids
from zorba_edge.data.generic_text import GENERIC_TEXT
from zorba_edge.engine.losses import lm_row_losses


def generic_batch(tokenizer: PreTrainedTokenizerBase, seq_len: int, text: str = GENERIC_TEXT) -> LMBatch:
    """The text as full rows of `seq_len` tokens (the tail that fills no row is dropped; a text
    shorter than one row is one shorter row), every text token a target. Each row opens with
    the special tokens the tokenizer puts before a text (its BOS), as every task row does
    (zorba_edge/data/collate.py): Gemma 3 270M without its BOS continues this text with "and
    and and" and scores 5.35 nats on it, so a watch on rows without it judged a model the run
    never trains."""
    prefix = special_prefix_ids(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    width = min(seq_len - len(prefix), len(ids))
    if width < 2:
        raise ValueError(f"the generic text needs rows of at least two tokens after the tokenizer's "
                         f"{len(prefix)} special one(s): {len(ids)} text tokens, seq_len {seq_len}")
    body = torch.tensor(ids[: len(ids) // width * width], dtype=torch.long).view(-1, width)
    rows = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(body), -1), body], dim=1)
    return LMBatch(rows, torch.ones_like(rows), rows.clone())


@torch.no_grad()
def generic_loss(model: nn.Module, batch: LMBatch, max_rows: int | None = None) -> float:
    """Mean next-token cross-entropy over the batch's rows, `max_rows` rows a forward pass (a
    round passes its batch size: the text's rows, 7 of 48 tokens on SmolLM2, may outnumber a
    small batch's, and the memory model counts one batch's forward)."""
    step = len(batch) if max_rows is None else max(1, max_rows)
    rows = [lm_row_losses(model, LMBatch(batch.input_ids[start:start + step],
                                         batch.attention_mask[start:start + step],
                                         batch.labels[start:start + step]))
            for start in range(0, len(batch), step)]
    return float(torch.cat(rows).mean())

