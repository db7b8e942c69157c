"""Tokenising collation: examples in, fixed-shape padded batches out.

Every batch is padded to exactly `seq_len` so that a client's memory use does not depend on
which examples it drew (the memory model assumes (batch, seq_len) activations). What is too
long is truncated in the part that can lose tokens: the text of a classification example,
never its template (the label word is scored right after the template, and room is kept for
all but the last token of the longest label word, which the scoring feeds in after the
prompt); the prompt of a generation example before its completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from zorba_common.errors import DataError
from zorba_edge.data.batches import IGNORE_INDEX, ClassificationBatch, LMBatch
from zorba_edge.data.examples import ClassificationExample, GenerationExample
from zorba_edge.data.templates import PromptTemplate, label_token_ids

Side = Literal["left", "right"]


def special_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens (BOS, say) the tokenizer puts before a text, as it was trained.

    Special tokens it appends (EOS on some tokenizers) are deliberately not used: the label
    word and the completion must follow the text directly.
    """
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id written under padding; it is masked out, so any valid id would do."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_rows(
    rows: Sequence[Sequence[int]], seq_len: int, value: int, side: Side
) -> torch.Tensor:
    """(len(rows), seq_len) int64, each row padded with `value` on `side`."""
    out = torch.full((len(rows), seq_len), value, dtype=torch.int64)
    for i, row in enumerate(rows):
        if len(row) > seq_len:
            raise ValueError(f"row {i} has {len(row)} tokens, more than seq_len={seq_len}")
        if row:
            values = torch.as_tensor(list(row), dtype=torch.int64)
            if side == "right":
                out[i, : len(row)] = values
            else:
                out[i, seq_len - len(row) :] = values
    return out


def _mask(lengths: Sequence[int], seq_len: int, side: Side) -> torch.Tensor:
    return pad_rows([[1] * n for n in lengths], seq_len, 0, side)


def _check_side(name: str, value: str) -> None:
    if value not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")


@dataclass
class ClassificationCollator:
    """Renders examples with a template and pads them into a ClassificationBatch."""

    tokenizer: PreTrainedTokenizerBase
    template: PromptTemplate
    seq_len: int = 64
    padding_side: Side = "right"
    """Right padding needs nothing from the model; the losses also handle left padding."""
    truncation_side: Side = "right"
    """Which end of a too-long text is cut: 'right' keeps its beginning."""
    trim: bool = True
    """Drop the padding columns no row needs (keeping room for the longest label word), so a
    batch of short texts costs a short forward; False pads every batch to seq_len."""
    _prefix: list[int] = field(init=False, repr=False)
    _label_tokens: torch.Tensor = field(init=False, repr=False)
    _room: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_side("padding_side", self.padding_side)
        _check_side("truncation_side", self.truncation_side)
        if not self.tokenizer.is_fast:
            raise DataError(
                "truncating a text without cutting its template needs a fast tokenizer "
                "(offset mappings); load it with use_fast=True"
            )
        sequences = label_token_ids(self.tokenizer, self.template)
        longest = max(len(tokens) for tokens in sequences)
        self._label_tokens = pad_rows(sequences, longest, IGNORE_INDEX, "right")
        self._prefix = special_prefix_ids(self.tokenizer)
        # The scoring appends a label's tokens but the last after the prompt (losses.py).
        self._room = self.seq_len - (longest - 1)
        bare = len(self._prefix) + len(self._plain(self.template.render("")))
        if bare >= self._room:
            raise DataError(
                f"the template takes {bare} tokens and the longest label word {longest}, "
                f"leaving no room for the text in seq_len={self.seq_len}; raise seq_len or "
                "shorten the template or the label words"
            )

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of the rendered prompt, the text cut (never the template) to fit seq_len."""
        text = text.strip()
        budget = self._room - len(self._prefix)
        ids = self._plain(self.template.render(text))
        if len(ids) <= budget:
            return self._prefix + ids
        # Cut the text at token boundaries, then re-render and re-tokenise the whole prompt, so
        # that the template is tokenised exactly as it would be after an uncut text.
        offsets = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True
        )["offset_mapping"]
        keep = len(offsets) - (len(ids) - budget)
        for kept in range(max(keep, 0), -1, -1):
            if kept == 0:
                cut = ""
            elif self.truncation_side == "right":
                cut = text[: offsets[kept - 1][1]]
            else:
                cut = text[offsets[len(offsets) - kept][0] :]
            ids = self._plain(self.template.render(cut))
            if len(ids) <= budget:
                return self._prefix + ids
        raise AssertionError("unreachable: the bare template was checked to fit")

    def __call__(self, examples: Sequence[ClassificationExample]) -> ClassificationBatch:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        num_labels = len(self.template.label_names)
        for example in examples:
            if not 0 <= example.label < num_labels:
                raise DataError(
                    f"label {example.label} is out of range for a template with {num_labels} "
                    f"labels {list(self.template.label_names)}"
                )
        rows = [self.encode(example.text) for example in examples]
        width = self.seq_len
        if self.trim:
            width = min(self.seq_len, max(len(r) for r in rows) + self._label_tokens.shape[1] - 1)
        return ClassificationBatch(
            input_ids=pad_rows(rows, width, padding_id(self.tokenizer), self.padding_side),
            attention_mask=_mask([len(r) for r in rows], width, self.padding_side),
            label_tokens=self._label_tokens.clone(),
            labels=torch.tensor([e.label for e in examples], dtype=torch.int64),
        )


@dataclass
class LMCollator:
    """Tokenises prompt + completion pairs into an LMBatch with targets on the completion."""

    tokenizer: PreTrainedTokenizerBase
    seq_len: int = 64
    padding_side: Side = "right"
    append_eos: bool = True
    """End the completion with EOS, so that the model learns where to stop."""
    _prefix: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_side("padding_side", self.padding_side)
        self._prefix = special_prefix_ids(self.tokenizer)
        if self.seq_len - len(self._prefix) < 2:
            raise DataError(
                f"seq_len={self.seq_len} leaves no room for a prompt and a completion after "
                f"{len(self._prefix)} special token(s); raise seq_len"
            )

    def encode(self, example: GenerationExample) -> tuple[list[int], list[int]]:
        """(input ids, labels); when too long, the prompt loses its beginning first, but keeps
        at least half the room, and the completion loses its end."""
        prompt = self.tokenizer.encode(example.prompt, add_special_tokens=False)
        completion = self.tokenizer.encode(example.completion, add_special_tokens=False)
        if self.append_eos and self.tokenizer.eos_token_id is not None:
            completion = completion + [int(self.tokenizer.eos_token_id)]
        if not completion:
            raise DataError(f"the completion {example.completion!r} has no tokens")
        budget = self.seq_len - len(self._prefix)
        if len(prompt) + len(completion) > budget:
            kept = min(len(prompt), max(budget - len(completion), budget // 2))
            prompt = prompt[len(prompt) - kept :]
            completion = completion[: budget - kept]
        context = self._prefix + prompt
        return context + completion, [IGNORE_INDEX] * len(context) + completion

    def __call__(self, examples: Sequence[GenerationExample]) -> LMBatch:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        encoded = [self.encode(example) for example in examples]
        side = self.padding_side
        return LMBatch(
            input_ids=pad_rows(
                [ids for ids, _ in encoded], self.seq_len, padding_id(self.tokenizer), side
            ),
            attention_mask=_mask([len(ids) for ids, _ in encoded], self.seq_len, side),
            labels=pad_rows([labels for _, labels in encoded], self.seq_len, IGNORE_INDEX, side),
        )
