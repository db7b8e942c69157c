"""Padded token batches, the input of the losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label value of positions that carry no target (prompt and padding), as in transformers."""


def _check_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
            f"{tuple(input_ids.shape)}"
        )


@dataclass(frozen=True)
class ClassificationBatch:
    """Prompts, each scored by the likelihood of every label's word following it."""

    input_ids: torch.Tensor
    """(batch, seq_len) int64 token ids of the prompts, padded on either side."""
    attention_mask: torch.Tensor
    """(batch, seq_len), 1 on real tokens and 0 on padding."""
    label_tokens: torch.Tensor
    """(num_labels, max_label_len) int64: each label word's tokens, IGNORE_INDEX after its end."""
    labels: torch.Tensor
    """(batch,) int64 label indices into label_tokens."""

    def __post_init__(self) -> None:
        _check_tokens(self.input_ids, self.attention_mask)
        if self.labels.shape != (self.input_ids.shape[0],):
            raise ValueError(
                f"labels shape {tuple(self.labels.shape)} does not match batch size "
                f"{self.input_ids.shape[0]}"
            )
        if self.label_tokens.ndim != 2 or bool((self.label_tokens[:, 0] == IGNORE_INDEX).any()):
            raise ValueError("label_tokens must be (num_labels, max_len) with at least one token per label")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def label_lengths(self) -> torch.Tensor:
        """(num_labels,) tokens in each label word."""
        return (self.label_tokens != IGNORE_INDEX).sum(dim=1)

    def to(self, device: torch.device | str) -> ClassificationBatch:
        return ClassificationBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            label_tokens=self.label_tokens.to(device),
            labels=self.labels.to(device),
        )


@dataclass(frozen=True)
class LMBatch:
    """Prompt/completion sequences; labels are IGNORE_INDEX except on completion tokens."""

    input_ids: torch.Tensor
    """(batch, seq_len) int64 token ids, padded on either side."""
    attention_mask: torch.Tensor
    """(batch, seq_len), 1 on real tokens and 0 on padding."""
    labels: torch.Tensor
    """(batch, seq_len) int64, aligned with input_ids (the loss shifts them by one)."""

    def __post_init__(self) -> None:
        _check_tokens(self.input_ids, self.attention_mask)
        if self.labels.shape != self.input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(self.labels.shape)} differs from input_ids shape "
                f"{tuple(self.input_ids.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
        )
