"""A client's local task: its examples, how they become batches, and the loss on them.

The examples never leave the device; only the trainer's scalars do. The batch shape (batch
size, sequence length) is the run's, so the collator is made when the run is known.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from transformers import PreTrainedTokenizerBase

from zorba_common.errors import DataError
from zorba_edge.data.batches import ClassificationBatch, LMBatch
from zorba_edge.data.collate import ClassificationCollator, LMCollator
from zorba_edge.data.examples import ClassificationExample, Example, GenerationExample
from zorba_edge.data.sampling import BatchSampler
from zorba_edge.data.templates import SENTIMENT_TEMPLATE, PromptTemplate
from zorba_edge.engine.losses import classification_loss, lm_loss
from zorba_edge.engine.zo import LossFn

CLASSIFICATION, GENERATION = "classification", "generation"

BUCKET_BATCHES = 16
"""Training batches are drawn from length-sorted windows of this many batches: on movie
reviews (median 27 of 48 tokens) a step then computes ~40% fewer tokens (docs/learning.md)."""


@dataclass
class LocalTask:
    """Examples of one kind plus the tokenizer and (for classification) the template."""

    examples: Sequence[Example]
    """All of one kind (checked on construction)."""
    tokenizer: PreTrainedTokenizerBase
    template: PromptTemplate | None = SENTIMENT_TEMPLATE
    seed: int = 0
    """Seeds this client's batch order (never the global RNG)."""
    _samplers: dict[int, BatchSampler] = field(default_factory=dict, init=False, repr=False)
    _collators: dict[int, ClassificationCollator | LMCollator] = field(
        default_factory=dict, init=False, repr=False)
    _lengths: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    _checks: dict[tuple[int, int], list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise DataError("the local task has no examples: give a non-empty data file")
        kinds = {type(e) for e in self.examples}
        if len(kinds) != 1:
            raise DataError("a task mixes classification and generation examples: use one kind per file")
        if self.kind == CLASSIFICATION and self.template is None:
            raise DataError("a classification task needs a prompt template with label words")

    @property
    def kind(self) -> str:
        return CLASSIFICATION if isinstance(self.examples[0], ClassificationExample) else GENERATION

    @property
    def loss_fn(self) -> LossFn:
        return classification_loss if self.kind == CLASSIFICATION else lm_loss

    def collator(self, seq_len: int) -> ClassificationCollator | LMCollator:
        if seq_len not in self._collators:
            made: ClassificationCollator | LMCollator
            if self.kind == CLASSIFICATION:
                assert self.template is not None
                made = ClassificationCollator(self.tokenizer, self.template, seq_len=seq_len)
            else:
                made = LMCollator(self.tokenizer, seq_len=seq_len)
            self._collators[seq_len] = made
        return self._collators[seq_len]

    def check(self, seq_len: int) -> None:
        """Collate every example once, with the tokenizer alone, before any weights load:
        a label word, template or example that cannot be used is a DataError naming it."""
        for index, example in enumerate(self.examples):
            try:
                self._collate(seq_len, [example])
            except DataError as error:
                raise DataError(f"example {index + 1} of the local data: {error}") from None

    def next_batch(self, batch_size: int, seq_len: int) -> Any:
        """The next training batch of this client's seeded, epoch-wise shuffled stream."""
        sampler = self._sampler(batch_size, seq_len)
        return self._collate(seq_len, [self.examples[i] for i in sampler.next_batch()])

    def batches_drawn(self, batch_size: int) -> int:
        """How far this client's stream of `batch_size` batches has come."""
        sampler = self._samplers.get(batch_size)
        return 0 if sampler is None else sampler.drawn

    def seek(self, batch_size: int, seq_len: int, drawn: int) -> None:
        """Stand where the stream stands after `drawn` batches, as if this task had drawn
        them (only indices are drawn: nothing is collated). For a process that does not live
        as long as the client's run, and keeps the count elsewhere (a Flower node's state)."""
        if drawn < 0:
            raise ValueError(f"a stream position is a count of batches, got {drawn}")
        if self.batches_drawn(batch_size) > drawn:
            self._samplers.pop(batch_size, None)  # behind us: start the stream again
        sampler = self._sampler(batch_size, seq_len)
        while sampler.drawn < drawn:
            sampler.next_batch()

    def _sampler(self, batch_size: int, seq_len: int) -> BatchSampler:
        sampler = self._samplers.get(batch_size)
        if sampler is None:
            rng = np.random.default_rng([self.seed, batch_size])
            sampler = self._samplers[batch_size] = BatchSampler(
                len(self.examples), batch_size, rng, self._trimmed_lengths(seq_len), BUCKET_BATCHES)
        return sampler

    def check_batch(self, batch_size: int, seq_len: int) -> Any:
        """The client's check batch: the same examples every round, so the loss on it measures
        the model and nothing else (the server's loss guard). Where the collator trims padding,
        its first `batch_size` examples no longer than the median (then any others, in order):
        a batch costs its longest row, and the first examples as they come (the longest of 8
        random reviews: the 48-token cap) took 1.6 times the forward of a training batch drawn
        from the length buckets (28 tokens) on SmolLM2, these (25 tokens) 0.9 times. Else its
        first `batch_size` examples."""
        key = (batch_size, seq_len)
        if key not in self._checks:
            lengths = self._trimmed_lengths(seq_len)
            if lengths is None:
                self._checks[key] = list(range(min(batch_size, len(self.examples))))
            else:
                longer = np.asarray(lengths) > np.median(lengths)
                self._checks[key] = np.argsort(longer, kind="stable")[:batch_size].tolist()
        return self._collate(seq_len, [self.examples[i] for i in self._checks[key]])

    def batches(self, batch_size: int, seq_len: int) -> Iterator[Any]:
        """Every example once (evaluation): shortest first where the collator trims padding,
        so that a batch costs about its own examples' length rather than the longest of a random
        32 (every evaluation sums over examples: the order changes no figure beyond float
        rounding); in the given order otherwise."""
        lengths = self._trimmed_lengths(seq_len)
        order = (range(len(self.examples)) if lengths is None
                 else np.argsort(np.asarray(lengths), kind="stable"))
        picked = [self.examples[i] for i in order]
        for start in range(0, len(picked), batch_size):
            yield self._collate(seq_len, picked[start : start + batch_size])

    def _trimmed_lengths(self, seq_len: int) -> list[int] | None:
        """Each example's rendered length, where the collator trims padding to the batch's
        longest row (else None: every batch costs seq_len whatever it holds)."""
        collate = self.collator(seq_len)
        if not (isinstance(collate, ClassificationCollator) and collate.trim):
            return None
        if seq_len not in self._lengths:
            texts = cast(Sequence[ClassificationExample], self.examples)
            self._lengths[seq_len] = [len(collate.encode(e.text)) for e in texts]
        return self._lengths[seq_len]

    def _collate(self, seq_len: int, examples: Sequence[Example]) -> ClassificationBatch | LMBatch:
        # The casts hold because a task is of one kind and its collator is made for that kind.
        collate = self.collator(seq_len)
        if isinstance(collate, ClassificationCollator):
            return collate(cast(Sequence[ClassificationExample], examples))
        return collate(cast(Sequence[GenerationExample], examples))

