"""The running server: the round engine's async, durable, HTTP-facing shell.

The round policy lives in `zorba_server.engine.RoundEngine` (pure, synchronous), and what a
long-poll answers, given the commits this shell has in flight, in `zorba_server.polling`.
This shell adds what a networked server needs around it: tokens, long-polls, a database that
holds every change before anyone is told about it, and one driver task that opens and closes
rounds, so closes never race each other; handlers only validate, queue a commit and wait.

Restart: `start()` loads the database and resumes exactly where the last commit left off:
the open round with the reports it acknowledged, alpha at the last applied round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from zorba_common.codec import encode
from zorba_common.messages import NextRound, RegisterRequest, RegisterResponse, Report, ReportAck
from zorba_server.base_rms import RMS_AGREEMENT
from zorba_server.broadcast import Broadcast
from zorba_server.config import ServerConfig
from zorba_server.engine import OpenRound, RoundClosure, RoundEngine, SolveFn, round_closed
from zorba_server.enrolment import Credentials, Tokens, check_enrolment
from zorba_server.errors import Refusal
from zorba_server.idempotency import ack, check_retry, content_hash, idempotency_conflict, stored_ack
from zorba_server.members import Member
from zorba_server.polling import poll_answer
from zorba_server.resume import resume
from zorba_server.round_line import closed_round_line
from zorba_server.rounds import ReceivedReport
from zorba_server.status_view import run_status
from zorba_server.storage import DuplicateError, ModelPin, Snapshot, Store
from zorba_server.traffic import ClientTraffic, RoundBytes
from zorba_server.weight_rounds import weight_rounds

log = logging.getLogger("zorba_server")

IDLE_RECHECK_S = 1.0


class Coordinator:
    def __init__(self, config: ServerConfig, store: Store, *,
                 solve: SolveFn | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._store = store
        self._clock = clock
        self.engine = RoundEngine(config, solve)
        self.run_id = ""
        self.created_at = 0.0
        self._tokens = Tokens()
        self.pending: dict[str, tuple[ReceivedReport, asyncio.Future[None]]] = {}
        """Reports of the open round whose commit is in flight."""
        self._closing = False
        self._advancing = False
        """The driver is closing a round and opening the next."""
        self._changed = Broadcast()
        """A round opened, a version without a round yet, or the run finished: what
        long-polls wait for."""
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._state_cache: tuple[int, bytes] | None = None
        self._registrations = 0
        """Over the run: the stored clients on a restart, plus this process's registrations."""
        self.traffic: defaultdict[str, ClientTraffic] = defaultdict(ClientTraffic)
        """Body bytes per client and round, as the HTTP layer counts them; each report's row
        stores its round's (restored on restart)."""
        self.weights = weight_rounds(config, self.engine)
        """fedavg's uploaded and averaged weights (other modes: none)."""

    @property
    def driving(self) -> bool:
        """The round driver task runs (what /healthz reports)."""
        return self._driver is not None and not self._driver.done()

    @property
    def counters(self) -> dict[str, int]:
        return {"registrations": self._registrations, **self.engine.counters()}

    def now(self) -> float:
        return self._clock()

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        snap = await self._store.load(self.config.run.catch_up_rounds)
        now = self._clock()
        if snap.run_id is None:
            await self._create_run(now)
        else:
            self._restore(snap, now)
        self._driver = asyncio.get_running_loop().create_task(self._drive(), name="zorba-rounds")

    async def stop(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        await asyncio.gather(*(future for _, future in self.pending.values()),
                             return_exceptions=True)

    async def _create_run(self, now: float) -> None:
        run = self.config.run
        self.run_id = secrets.token_hex(8)
        self.created_at = now
        await self._store.create_run(self.run_id, run.seed, run.pool_size, now)
        if run.model_fingerprint is not None and run.footprint is not None:
            # The config pins the model (a failed commit fails the start: no engine is kept).
            alpha = self.engine.pin(run.model_fingerprint, run.footprint)
            await self._store.pin_model(run.model_fingerprint, run.footprint, alpha)
        log.info("created run %s (seed %d, K=%d)", self.run_id, run.seed, run.pool_size)

    def _restore(self, snap: Snapshot, now: float) -> None:
        resumed = resume(self.engine, snap, self.config.run, now)
        self.run_id, self.created_at = resumed.run_id, resumed.created_at
        self._tokens = resumed.tokens
        self._registrations = len(snap.clients)
        self.traffic.update(resumed.traffic)
        engine = self.engine
        log.info("resumed run %s at version %d, round %d%s", self.run_id, engine.version,
                 engine.round_counter - (engine.open is not None),
                 " (open)" if engine.open is not None else "")

    # ------------------------------------------------------------------------ requests

    def authenticate(self, token: str | None) -> Member:
        member = self._tokens.holder(token, self.engine.members)
        if self.engine.mark_seen(member, self._clock()):
            # It left and came back: a restart must count it active again (queued now; a
            # failure only means a restart sees it as gone until its next request).
            returned = asyncio.ensure_future(self._store.set_left(member.client_id, None))
            returned.add_done_callback(_log_failure)
        return member

    async def leave(self, member: Member) -> None:
        """The client stops: it is no longer active (the next schedule leaves it out, without
        waiting for its membership timeout), durably, until its next request."""
        await self._store.set_left(member.client_id, self._clock())
        self.engine.mark_left(member)
        log.info("client %s left", member.client_id)
        self._wake.set()  # a round whose other clients all reported closes now, not at its deadline

    async def register(self, request: RegisterRequest) -> RegisterResponse:
        check_enrolment(request, self.config.enrolment_secret)
        profile = request.profile
        engine = self.engine
        try:
            engine.check_registration(profile)
        except Refusal as exc:
            log.info("refused the registration of %s (%s): %s", profile.name or "a device",
                     exc.code, exc.message)
            raise
        now = self._clock()
        new = Credentials.new()
        # Pinned before awaiting the commit so concurrent registrations compare against it.
        alpha = engine.pin_first(profile)
        pin = ModelPin(profile.model_fingerprint, profile.footprint, alpha) if alpha is not None else None
        try:
            await self._store.insert_client(new.client_id, new.token_hash, profile, now, pin)
        except Exception:
            if pin is not None:
                engine.unpin()
            raise
        engine.add_member(Member.joining(new.client_id, profile, now))
        if new.client_id in engine.base_rms_ignored:
            log.warning("client %s sent base-weight RMS values that stand apart from the other "
                        "clients' (more than %.0f%% on a block): the drift bound ignores them",
                        new.client_id, 100 * RMS_AGREEMENT)
        self._tokens.add(new.token_hash, new.client_id)
        self._registrations += 1
        log.info("registered %s%s: %s, budget %.0f MiB, %d samples", new.client_id,
                 f" ({profile.name})" if profile.name else "", profile.device_type,
                 profile.memory_budget_bytes / 2**20, profile.num_samples)
        self._wake.set()
        return RegisterResponse(new.client_id, new.token, engine.run_info(self.run_id))

    async def next_round(self, member: Member, version: int, wait_s: float) -> NextRound:
        loop = asyncio.get_running_loop()
        end = loop.time() + min(max(wait_s, 0.0), self.config.run.poll_timeout_s)
        cid = member.client_id
        while True:
            remaining = end - loop.time()
            answer = poll_answer(self.engine, cid, version, self._clock(), timed_out=remaining <= 0,
                                 committing=cid in self.pending, closing=self._closing,
                                 advancing=self._advancing)
            if answer is not None:
                return answer
            await self._changed.wait(remaining)

    async def submit_report(self, member: Member, round_: int, report: Report, *,
                            body_bytes: int) -> bytes:
        """Store a report and return its ack, encoded (a retry's: the original ack).
        `body_bytes`: the request body's size; the caller sends the ack and counts neither
        (this counts both: a new report's row stores the bytes of the client's round it ends)."""
        cid = member.client_id
        # Encoded once: the content hash and the stored row share it.
        encoded = encode(report)
        digest = content_hash(round_, encoded)
        r = self.engine.open
        if r is None or r.plan.round != round_:
            # A retry of a report stored in an earlier round gets that report's ack.
            found = await self._store.find_report(cid, report.idempotency_key)
            if found is None:
                raise self.engine.refuse_round(round_)
            return self._retry_answered(cid, body_bytes, stored_ack(found, round_, report, digest))
        prior = r.received.get(cid) or (self.pending[cid][0] if cid in self.pending else None)
        if prior is not None:
            check_retry(prior, round_, report, digest)
            if cid in self.pending:
                try:
                    await asyncio.shield(self.pending[cid][1])
                except DuplicateError:
                    raise idempotency_conflict(report.idempotency_key) from None
            return self._retry_answered(cid, body_bytes, ack(round_, prior))
        now = self._clock()
        if self._closing:
            raise round_closed(round_)
        self.engine.check_report(cid, round_, report, now)
        self.weights.check_uploaded(round_, cid)
        received = ReceivedReport(cid, report, digest, now, encoded=encoded)
        answer = encode(ack(round_, received))
        sizes = (body_bytes, len(answer))
        ended = self.traffic[cid].end_round(*sizes)
        # Queued now (the store orders writes by call); a future (the SQL stores' own, or a
        # task around another store's coroutine) so that the callback below is registered
        # before anyone awaits it and runs first when the commit lands: the round's book is
        # updated before any waiter (a close) looks at it.
        committed = asyncio.ensure_future(self._store.insert_report(round_, received, ended))
        committed.add_done_callback(partial(self._report_committed, r, received, ended, sizes))
        self.pending[cid] = (received, committed)
        try:
            await asyncio.shield(committed)
        except DuplicateError:
            # (client, key) was used in an earlier round: nothing was stored.
            raise idempotency_conflict(report.idempotency_key) from None
        return answer

    def _report_committed(self, r: OpenRound, received: ReceivedReport, ended: RoundBytes,
                          sizes: tuple[int, int], committed: asyncio.Future[None]) -> None:
        self.pending.pop(received.client_id, None)
        traffic = self.traffic[received.client_id]
        if committed.cancelled() or committed.exception() is not None:
            traffic.not_stored(ended, *sizes)
            return
        traffic.stored(ended)  # stored: shown whatever becomes of the round
        if self.engine.open is not r:
            return
        self.engine.accept_report(received)
        if self.engine.due(self._clock()):
            self._wake.set()

    async def receive_weights(self, member: Member, round_: int,
                              chunks: AsyncIterable[bytes]) -> int:
        """fedavg: a client's trained weights for the open round (before its report)."""
        cid = member.client_id
        r = self.engine.open
        reported = r is not None and cid in r.received or cid in self.pending
        return await self.weights.receive(r, round_, cid, busy=self._closing,
                                          reported=reported, now=self._clock(), chunks=chunks)

    def weights_file(self) -> tuple[Path, int]:
        """fedavg: the current global weights and their version (404 at version 0)."""
        return self.weights.current()

    def state(self) -> bytes:
        """The encoded AlphaState (cached per version: catch-up storms share one encoding)."""
        version = self.engine.version
        if self._state_cache is None or self._state_cache[0] != version:
            self._state_cache = (version, encode(self.engine.alpha_state(self.run_id)))
        return self._state_cache[1]

    # ------------------------------------------------------------------------ rounds

    async def _drive(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._advance()
            except Exception:
                log.exception("round driver failed; retrying in %.0f s", IDLE_RECHECK_S)
                await asyncio.sleep(IDLE_RECHECK_S)
            left = self.engine.time_left(self._clock())  # (the open round's deadline)
            await _wait_for_event(self._wake, IDLE_RECHECK_S if left is None else left)

    async def _advance(self) -> None:
        version = self.engine.version
        self._advancing = True
        try:
            if self.engine.due(self._clock(), committing=bool(self.pending)):
                await self._close()
            if self.engine.open is None and not self.engine.finished:
                await self._try_open()
        finally:
            self._advancing = False
            # A new version and no round for it yet (none proposed, or opening it failed after
            # the close was stored): wake the long-polls, or they hear of it at their timeout.
            if self.engine.version != version and self.engine.open is None:
                self._changed.notify()

    async def _try_open(self) -> None:
        engine = self.engine
        # The scheduler may take seconds (a MILP): off the event loop, on the members as they
        # are now (a registration during the solve joins the next round).
        now = self._clock()
        plan = await asyncio.to_thread(engine.propose_round, now, engine.active_members(now))
        if plan is None:
            return
        await self._store.insert_round(plan)
        engine.open_round(plan)
        self._changed.notify()
        log.info("round %d open: %d clients, deadline in %.0f s%s", plan.round, len(plan.clients),
                 self.config.run.round_duration_s,
                 f" (the final check of version {plan.base_version})" if plan.final_check else "")
        for cid, why in sorted(plan.excluded.items()):
            log.info("round %d: client %s left out: %s", plan.round, cid, why)

    async def _close(self) -> None:
        self._closing = True
        try:
            await asyncio.gather(*(future for _, future in self.pending.values()),
                                 return_exceptions=True)
            closure = self.engine.decide_close(self._clock())
            await self.weights.average(closure)
            outcome = closure.outcome
            await self._store.close_round(
                closure.plan.round, outcome.status, closure.closed_at, outcome.reports,
                outcome.loss, outcome.message, delta=closure.delta, alpha=closure.alpha,
                calibrations=closure.calibrations, guard_outliers=closure.guard_outliers,
                safety=self.engine.safety_after(closure))
            self._after_close(closure)
        finally:
            self._closing = False

    def _after_close(self, closure: RoundClosure) -> None:
        self.engine.apply_close(closure)
        if self.engine.finished:
            self._changed.notify()
        self.weights.closed(closure)
        log.log(*closed_round_line(closure, self.engine))

    # ------------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        return run_status(self.engine, self.run_id, self.counters, self._clock(),
                          pending=len(self.pending), traffic=self.traffic)

    def count_traffic(self, client_id: str, up: int, down: int) -> None:
        """Bodies of an answered request, except a report answered 200 (`submit_report`
        counts that one itself)."""
        self.traffic[client_id].add(up, down)

    def _retry_answered(self, client_id: str, body_bytes: int, ack: ReportAck) -> bytes:
        """A retry ends no round (its report's row holds that round's bytes already): its bytes
        count toward the next one."""
        answer = encode(ack)
        self.count_traffic(client_id, body_bytes, len(answer))
        return answer


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.warning("could not record a client's return: %s", done.exception())


async def _wait_for_event(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` passes. Not `asyncio.wait_for`: before Python 3.12
    it can swallow a cancellation that arrives as the event is set (a leave waking the
    driver while the server stops), and the driver then loops on and `stop` waits forever."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()

