"""Retry delays while the server is away: growth, jitter, ceiling and the give-up time."""

from __future__ import annotations

import random

import pytest

from zorba_edge.client.backoff import Backoff


def test_delays_grow_exponentially_up_to_the_ceiling_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(initial_s=0.5, factor=2.0, max_s=8.0)
    rng = random.Random(1)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
        assert backoff.ceiling(attempt) == ceiling
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        # Jitter: clients that lost the server together do not retry together.
        assert len({round(d, 9) for d in delays}) > 150


def test_a_very_long_outage_keeps_a_finite_delay() -> None:
    assert Backoff(max_s=30.0).ceiling(10_000) == 30.0


def test_without_a_give_up_time_it_keeps_trying() -> None:
    backoff = Backoff()
    delay = backoff.next_delay(500, outage_s=10**9, rng=random.Random(0))
    # A billion seconds out, still the ordinary jittered delay at the ceiling, not a give-up.
    assert delay == backoff.delay(500, random.Random(0))
    assert delay is not None and backoff.max_s / 2 <= delay <= backoff.max_s


def test_it_gives_up_once_the_outage_lasts_the_give_up_time_and_never_sleeps_past_it() -> None:
    backoff = Backoff(initial_s=4.0, max_s=4.0, give_up_after_s=10.0)
    rng = random.Random(0)
    assert backoff.next_delay(0, outage_s=0.0, rng=rng) <= 4.0
    assert backoff.next_delay(3, outage_s=9.0, rng=rng) <= 1.0 + 1e-12
    assert backoff.next_delay(4, outage_s=10.0, rng=rng) is None


@pytest.mark.parametrize("kwargs", [{"initial_s": 0}, {"factor": 0.5}, {"max_s": 0.1},
                                    {"give_up_after_s": -1}])
def test_nonsense_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
