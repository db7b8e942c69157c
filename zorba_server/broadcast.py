"""One signal that wakes every waiter at once, then re-arms: what long-polls wait on.

A round opening wakes thousands of waiting polls; each waits on the same plain future (no
task per poll), and the next wait after a wake-up gets a fresh one.
"""

from __future__ import annotations

import asyncio


class Broadcast:
    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self, timeout: float) -> None:
        """Until the next `notify`, or `timeout` seconds."""
        if self._future is None or self._future.done():
            self._future = asyncio.get_running_loop().create_future()
        # asyncio.wait, not wait_for: no task wraps the future.
        await asyncio.wait((self._future,), timeout=timeout)

    def notify(self) -> None:
        """Wake every current waiter."""
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None
