"""The round driver stops when cancelled, even as a leave wakes it in the same moment.

Before Python 3.12 `asyncio.wait_for` returns the awaited result when a cancellation arrives as
that result does, swallowing the cancellation: the driver's loop ran on and the server's stop
waited forever (seen once as a hung test teardown after a leave). The driver waits with
`_wait_for_event` instead. Deterministic: the event loop runs the steps in order, no clock."""

from __future__ import annotations

import asyncio

import pytest

from zorba_server.coordinator import _wait_for_event

pytestmark = pytest.mark.asyncio


async def _driver_like(event: asyncio.Event) -> None:
    while True:
        await _wait_for_event(event, 3600.0)
        event.clear()


@pytest.mark.parametrize("steps_between", [0, 1, 2, 3])
async def test_a_driver_woken_as_it_is_cancelled_still_stops(steps_between: int) -> None:
    event = asyncio.Event()
    driver = asyncio.ensure_future(_driver_like(event))
    for _ in range(3):
        await asyncio.sleep(0)  # the driver is waiting
    event.set()  # a leave wakes it ...
    for _ in range(steps_between):
        await asyncio.sleep(0)
    driver.cancel()  # ... as the server stops
    done, _ = await asyncio.wait({driver}, timeout=5.0)  # a bound only; done in a few steps
    assert driver in done and driver.cancelled()


async def test_the_wait_ends_when_the_event_is_set() -> None:
    event = asyncio.Event()
    waiting = asyncio.ensure_future(_wait_for_event(event, 3600.0))
    await asyncio.sleep(0)
    event.set()
    await asyncio.wait_for(waiting, 5.0)
    assert waiting.done() and not waiting.cancelled()
