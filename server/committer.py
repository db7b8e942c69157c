"""Group commit: many concurrent writes, one transaction and one fsync.

An fsync costs milliseconds, so committing each report alone would cap the server at a
few hundred reports a second. Writers queue an operation and await its future; one task
takes everything queued, runs it as one transaction, and resolves each future with the
op's own result or error only after COMMIT returned. An acknowledgement therefore always
follows durability.

The statements run on the event loop (they take microseconds each) and only COMMIT, which
waits on the disk, runs on a helper thread. Running whole batches on the thread was
several times slower under load: every statement needs the GIL back from a busy event
loop, and each handover can take the interpreter's 5 ms switch interval.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zorba_server import storage


class Committer:
    """Serialises every database access through one connection, in batches."""

    def __init__(self, conn: sqlite3.Connection, *, max_batch: int = 1024) -> None:
        self._conn = conn
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[storage.Op, asyncio.Future[Any]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zorba-sqlite")
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.ops = 0
        self.busy_s = 0.0
        """Time spent in transactions (mostly fsync): the storage side of request latency."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="zorba-committer")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, op: storage.Op) -> Any:
        """Run `op(conn)` in the next transaction; returns its result after the commit."""
        # A cancelled caller (client gone) must not cancel the op: it may already be durable.
        return await asyncio.shield(self.enqueue(op))

    def enqueue(self, op: storage.Op) -> asyncio.Future[Any]:
        """Queue `op`; the future resolves after the commit. Never cancel it (shield it)."""
        if self._task is None:
            raise RuntimeError("the committer is not running (call start() first)")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, future))
        return future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            ops = [op for op, _ in batch]
            started = time.perf_counter()
            results = storage.begin_batch(self._conn, ops)
            try:
                failure = await loop.run_in_executor(self._executor, storage.commit, self._conn)
            except Exception as exc:  # the executor itself failed: every op fails with it
                failure = exc
            if failure is not None:
                results = [failure] * len(batch)
            self.busy_s += time.perf_counter() - started
            self.batches += 1
            self.ops += len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                self._queue.task_done()
