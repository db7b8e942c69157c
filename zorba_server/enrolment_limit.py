"""Failed enrolments slow down, per source address (pure: the caller passes the time).

Nothing slowed down guessing the enrolment secret: 1,450-2,800 wrong guesses per second, all
plain 403s (issue 27). A source gets FREE_FAILURES wrong secrets for free (a typo, a client
started with an old secret); after that each failure blocks it for a delay that doubles, from
BASE_DELAY_S up to MAX_DELAY_S, during which its registrations are refused with 429 and a
`Retry-After` before the secret is even compared. A success clears its record; a source that
fails nothing for FORGET_AFTER_S starts afresh. Behind a proxy every client shares the proxy's
address: the free failures and a success's reset keep honest clients going there.

Memory is bounded: at most MAX_SOURCES records, the least recently failing dropped first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from zorba_server import errors

FREE_FAILURES = 5
BASE_DELAY_S = 1.0
MAX_DELAY_S = 3600.0
FORGET_AFTER_S = 3600.0
MAX_SOURCES = 100_000


@dataclass
class _Source:
    failures: int = 0
    last_failure: float = -math.inf
    blocked_until: float = -math.inf


class EnrolmentLimiter:
    """Per source address: how many enrolments failed lately, and until when it waits."""

    def __init__(self) -> None:
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def check(self, source: str, now: float) -> None:
        """TooManyRequests while the source waits out its delay."""
        record = self._sources.get(source)
        if record is not None and now < record.blocked_until:
            wait = record.blocked_until - now
            raise errors.TooManyRequests("enrolment_throttled", (
                f"{record.failures} registrations with a wrong enrolment secret from {source}: "
                f"retry in {math.ceil(wait)} s with the run's secret (ask its operator)"), wait)

    def failed(self, source: str, now: float) -> float:
        """Count a wrong secret; the delay the source now waits (0 while failures are free)."""
        record = self._sources.pop(source, None) or _Source()
        if now - record.last_failure > FORGET_AFTER_S:
            record = _Source()
        record.failures += 1
        record.last_failure = now
        extra = record.failures - FREE_FAILURES
        delay = 0.0 if extra <= 0 else min(MAX_DELAY_S, BASE_DELAY_S * 2.0 ** (extra - 1))
        record.blocked_until = now + delay
        self._sources[source] = record
        while len(self._sources) > MAX_SOURCES:
            self._sources.popitem(last=False)
        return delay

    def succeeded(self, source: str) -> None:
        self._sources.pop(source, None)

    def throttled(self, now: float) -> int:
        """Sources waiting out a delay now (a gauge for /metrics)."""
        return sum(1 for r in self._sources.values() if now < r.blocked_until)
