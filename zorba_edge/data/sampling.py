"""Seeded batch sampling: an endless stream of index batches, reshuffled every epoch.

The Generator is passed in by the caller and is the only source of randomness, so a client
that rebuilds its sampler from the same seed draws the same batches, and nothing else in the
process (a library touching the global RNG, say) can shift them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class BatchSampler:
    """Index batches of `batch_size` drawn without replacement within each epoch.

    The remainder of an epoch that does not fill a batch is dropped (it is reshuffled into
    the next epochs), so every batch has the fixed size the memory model assumes. Given each
    example's length and `bucket_batches` > 1, batches are drawn from length-sorted windows
    of that many batches (bucketing: a collator that trims padding then computes less). With fewer
    examples than `batch_size`, every batch is the whole set in a new order.
    """

    def __init__(self, num_examples: int, batch_size: int, rng: np.random.Generator,
                 lengths: Sequence[int] | None = None, bucket_batches: int = 1) -> None:
        if num_examples < 1:
            raise ValueError(f"cannot sample batches from {num_examples} examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                f"got {type(rng).__name__}"
            )
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"{len(lengths)} lengths given for {num_examples} examples")
        if bucket_batches < 1:
            raise ValueError(f"bucket_batches must be at least 1, got {bucket_batches}")
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self._rng = rng
        self._lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self._bucket = bucket_batches
        self._order = np.empty(0, dtype=np.int64)
        self._position = 0
        self.drawn = 0
        """Batches drawn so far: a fresh sampler from the same seed that draws this many
        stands where this one stands (how a process that restarts resumes the stream)."""

    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def next_batch(self) -> np.ndarray:
        """The next batch's example indices (int64, distinct)."""
        if self._position + self.batch_size > len(self._order):
            self._order = self._epoch_order()
            self._position = 0
        batch = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        self.drawn += 1
        return batch

    def _epoch_order(self) -> np.ndarray:
        """A fresh permutation; with lengths, each window of `bucket_batches` batches is sorted
        by length, cut into batches, and those batches shuffled, so a batch holds examples of
        similar length (less padding to compute) while every epoch still sees each example once."""
        order = self._rng.permutation(self.num_examples)
        if self._lengths is None or self._bucket == 1:
            return order
        size = self.batch_size
        usable = len(order) - len(order) % size
        window = size * self._bucket
        for start in range(0, usable, window):
            chunk = order[start : min(start + window, usable)]
            chunk = chunk[np.argsort(self._lengths[chunk], kind="stable")]
            batches = chunk.reshape(-1, size)
            order[start : start + len(chunk)] = batches[self._rng.permutation(len(batches))].reshape(-1)
        return order

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()
