"""Retry delays while the server is away: exponential, jittered, and bounded by a give-up time.

Full jitter (a uniform draw below the exponential ceiling) keeps a federation whose server
restarted from reconnecting in lock-step. The give-up time is measured from the first
failure of an outage, so a long-running client that loses its server for a minute a day
never accumulates towards it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    """Ceiling of the first delay."""
    factor: float = 2.0
    max_s: float = 30.0
    """Ceiling of any delay."""
    give_up_after_s: float | None = None
    """Stop retrying once an outage lasts this long (None: keep trying)."""

    def __post_init__(self) -> None:
        if not (self.initial_s > 0 and self.factor >= 1 and self.max_s >= self.initial_s):
            raise ValueError("backoff needs initial_s > 0, factor >= 1 and max_s >= initial_s")
        if self.give_up_after_s is not None and not self.give_up_after_s >= 0:
            raise ValueError("give_up_after_s must be >= 0 (or None: keep trying)")

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay after failed attempt number `attempt` (0-based)."""
        # Capping the exponent keeps factor ** attempt finite after days of retries.
        exponent = min(attempt, 64)
        return min(self.max_s, self.initial_s * self.factor**exponent)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A jittered delay in [ceiling / 2, ceiling]: never a busy loop, never in lock-step."""
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + rng.random() * ceiling / 2

    def next_delay(self, attempt: int, outage_s: float, rng: random.Random) -> float | None:
        """The delay before the next try, or None when the outage has lasted long enough.

        The last delay is shortened so the final try happens at the give-up time, not after.
        """
        if self.give_up_after_s is None:
            return self.delay(attempt, rng)
        left = self.give_up_after_s - outage_s
        if left <= 0:
            return None
        return min(self.delay(attempt, rng), left)

    def describe(self) -> str:
        if self.give_up_after_s is None or math.isinf(self.give_up_after_s):
            return "retrying until it is back"
        return f"giving up after {self.give_up_after_s:.0f} s without it"
