"""Group commit: many concurrent writes, one transaction and one fsync.

An fsync costs milliseconds, so committing each report alone would cap the server at a
few hundred reports a second. Writers queue an operation and await its future; one task
takes everything queued, runs it as one transaction, and resolves each future with the
op's own result or error only after COMMIT returned. An acknowledgement therefore always
follows durability.

For SQLite the statements run on the event loop (they take microseconds each) and only
COMMIT, which waits on the disk, runs on a helper thread. Running whole batches on the
thread was several times slower under load: every statement needs the GIL back from a busy
event loop, and each handover can take the interpreter's 5 ms switch interval. For
PostgreSQL each statement is a round trip to the database server, so there the whole batch
runs on the thread (`statements_on_thread`).

Both stores (`sqlite.py`, `postgres.py`) use this one committer over their connection.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zorba_server.storage import sql


class Committer:
    """Serialises every database access through one connection, in batches."""

    def __init__(self, conn: sql.Connection, *, max_batch: int = 1024,
                 begin: str = "BEGIN IMMEDIATE", statements_on_thread: bool = False) -> None:
        self._conn = conn
        self._begin = begin
        self._statements_on_thread = statements_on_thread
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[sql.Op, asyncio.Future[Any]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zorba-commit")
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

    async def submit(self, op: sql.Op) -> Any:
        """Run `op(conn)` in the next transaction; returns its result after the commit."""
        # A cancelled caller (client gone) must not cancel the op: it may already be durable.
        return await asyncio.shield(self.enqueue(op))

    def enqueue(self, op: sql.Op) -> asyncio.Future[Any]:
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
            try:
                if self._statements_on_thread:
                    results = await loop.run_in_executor(
                        self._executor, sql.run_batch, self._conn, ops, self._begin)
                else:
                    results = sql.begin_batch(self._conn, ops, self._begin)
                    failure = await loop.run_in_executor(self._executor, sql.commit, self._conn)
                    if failure is not None:
                        results = [failure] * len(batch)
            except Exception as exc:  # the executor itself failed: every op fails with it
                results = [exc] * len(batch)
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
