"""The progress callback that slow library calls take, and nothing that draws it.

Loading, exporting, the timing probe and evaluation report `progress(done, total)` after
each unit of work (a block, a timed call, a batch); how that is shown, a bar on a terminal
or a line every few seconds in a log, is the caller's choice (client/progress.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Progress = Callable[[int, int], None]
"""progress(done, total), called after each unit of work."""

T = TypeVar("T")


def tracked(items: Iterable[T], total: int, progress: Progress | None) -> Iterator[T]:
    """Yield `items`, reporting each one as done once the consumer asks for the next."""
    done = 0
    for item in items:
        yield item
        done += 1
        if progress is not None:
            progress(done, total)
