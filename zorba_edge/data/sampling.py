"""Seeded batch sampling: an endless stream of index batches, reshuffled every epoch.

The Generator is passed in by the caller and is the only source of randomness, so a client
that rebuilds its sampler from the same seed draws the same batches, and nothing else in the
process (a library touching the global RNG, say) can shift them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class BatchSampler:
    """Index batches of `batch_size` drawn without replacement within each epoch.

    The remainder of an epoch that does not fill a batch is dropped (it is reshuffled into
    the next epochs), so every batch has the fixed shape the memory model assumes. With fewer
    examples than `batch_size`, every batch is the whole set in a new order.
    """

    def __init__(self, num_examples: int, batch_size: int, rng: np.random.Generator) -> None:
        if num_examples < 1:
            raise ValueError(f"cannot sample batches from {num_examples} examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                f"got {type(rng).__name__}"
            )
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self._rng = rng
        self._order = np.empty(0, dtype=np.int64)
        self._position = 0

    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def next_batch(self) -> np.ndarray:
        """The next batch's example indices (int64, distinct)."""
        if self._position + self.batch_size > len(self._order):
            self._order = self._rng.permutation(self.num_examples)
            self._position = 0
        batch = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()
