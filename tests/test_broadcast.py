"""zorba_server/broadcast.py: one notify wakes every long-poll waiting, and only those."""

from __future__ import annotations

import asyncio

import pytest

from zorba_server.broadcast import Broadcast

pytestmark = pytest.mark.asyncio


async def test_one_notify_wakes_every_waiter_before_its_timeout() -> None:
    signal = Broadcast()
    loop = asyncio.get_running_loop()
    start = loop.time()
    waiters = [asyncio.ensure_future(signal.wait(30.0)) for _ in range(3)]
    await asyncio.sleep(0.01)  # all three are waiting
    signal.notify()
    await asyncio.wait_for(asyncio.gather(*waiters), timeout=5.0)
    assert loop.time() - start < 5.0


async def test_a_wait_after_a_notify_waits_for_the_next_one() -> None:
    signal = Broadcast()
    signal.notify()  # nobody waiting: nothing is remembered
    waiter = asyncio.ensure_future(signal.wait(30.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    signal.notify()
    await asyncio.wait_for(waiter, timeout=5.0)
    later = asyncio.ensure_future(signal.wait(0.05))  # re-armed: times out
    await asyncio.wait_for(later, timeout=5.0)
