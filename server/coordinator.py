"""The running server: registration, long-polls, reports and the life of each round.

The coordinator holds the run's state in memory (alpha, members, the open round) and the
database holds the same state durably; every change is committed before anyone is told
about it. One driver task opens and closes rounds, so closes never race each other;
handlers only validate, queue a commit and wait for it.

Restart: `start()` loads the database and resumes exactly where the last commit left
off: the open round with the reports it acknowledged, alpha at the last applied round.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from zorba_edge.common.memory_model import LinearMemoryModel, ModelFootprint, linear_memory_model
from zorba_edge.common.schema import (
    FEDAVG,
    FINISHED,
    MAX_WEIGHTS_BYTES,
    PROTOCOL_VERSION,
    TRAIN,
    WAIT,
    AlphaDelta,
    AlphaState,
    DeviceProfile,
    HyperParams,
    NextRound,
    RegisterRequest,
    RegisterResponse,
    Report,
    ReportAck,
    RunInfo,
    encode,
)
from zorba_server import errors, storage
from zorba_server.aggregation import apply_delta
from zorba_server.committer import Committer
from zorba_server.config import ConfigError, ServerConfig
from zorba_server.pool import round_pool_indices
from zorba_server.rounds import (
    APPLIED,
    OPEN,
    ClientPlan,
    ReceivedReport,
    RoundOutcome,
    RoundPlan,
    check_report,
    close_round,
)
from zorba_server.scheduler import (
    ClientSpec,
    Schedule,
    SchedulerConfig,
    local_steps,
    solve_schedule,
)
from zorba_server.weights import Upload, WeightStore

log = logging.getLogger("zorba_server")

SolveFn = Callable[[Sequence[ClientSpec], Sequence[int], SchedulerConfig], Schedule]

# Calibration learned from measured peaks: an EMA of peak / predicted, kept in a band so
# one odd measurement cannot make a client look free or unusable.
CALIBRATION_MIN, CALIBRATION_MAX, CALIBRATION_EMA = 0.5, 8.0, 0.5
# Re-solve the schedule when a calibration moves by more than this factor.
CALIBRATION_STEP = 1.1
IDLE_RECHECK_S = 1.0
STATUS_ROUNDS = 500
"""Most recent rounds listed by /v1/status and the status page."""


@dataclass
class Member:
    client_id: str
    token_hash: bytes
    profile: DeviceProfile
    registered_at: float
    calibration: float
    last_seen: float
    step_time_s: float
    rounds_reported: int = 0
    last_loss: float | None = None
    last_peak_bytes: int = 0


@dataclass
class OpenRound:
    plan: RoundPlan
    received: dict[str, ReceivedReport] = field(default_factory=dict)
    """Committed (acknowledgeable) reports."""
    pending: dict[str, tuple[ReceivedReport, asyncio.Future[None]]] = field(default_factory=dict)
    """Reports whose commit is in flight."""
    closing: bool = False

    def complete(self) -> bool:
        return not self.pending and len(self.received) == len(self.plan.clients)


@dataclass(frozen=True)
class RoundSummary:
    round: int
    status: str
    assigned: int
    reports: int
    opened_at: float
    closed_at: float | None
    loss: float | None
    message: str
    method: str


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def report_hash(round_: int, report: Report) -> bytes:
    """Content identity of a report (canonical re-encoding, so int-for-float is the same)."""
    return hashlib.sha256(round_.to_bytes(8, "little") + encode(report)).digest()


class Coordinator:
    def __init__(self, config: ServerConfig, committer: Committer, *,
                 solve: SolveFn = solve_schedule, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._committer = committer
        self._solve = solve
        self._clock = clock
        run = config.run
        self.run_id = ""
        self.seed = run.seed
        self.pool_size = run.pool_size
        self.created_at = 0.0
        self.fingerprint: str | None = None
        self.footprint: ModelFootprint | None = None
        self.alpha: np.ndarray | None = None
        self.version = 0
        self.deltas: deque[AlphaDelta] = deque(maxlen=run.catch_up_rounds)
        self.members: dict[str, Member] = {}
        self._by_token: dict[bytes, str] = {}
        self.history: list[RoundSummary] = []
        self.open: OpenRound | None = None
        self.round_counter = 1
        """Number the next round to open gets."""
        self.finished = False
        self.idle_reason = "starting"
        self.last_schedule: Schedule | None = None
        self._schedule_key: tuple[Any, ...] | None = None
        self._previous: dict[str, frozenset[int]] = {}
        self.last_plan: RoundPlan | None = None
        self._changed: asyncio.Future[None] | None = None
        """Resolved when a round opens or the run finishes: what long-polls wait for."""
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._state_cache: tuple[int, bytes] | None = None
        self.counters: dict[str, int] = {
            "registrations": 0, "reports_accepted": 0, "rounds_applied": 0, "rounds_failed": 0,
            "schedules_solved": 0,
        }
        self.schedule_solve_s = 0.0
        self.weights = (WeightStore(config.storage.path, keep_versions=run.keep_weight_versions,
                                    max_upload_bytes=MAX_WEIGHTS_BYTES)
                        if run.mode == FEDAVG else None)
        """fedavg only: uploaded and averaged weights (server/weights.py)."""

    # ------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        snap = await self._committer.submit(
            partial(storage.load, recent_deltas=self.config.run.catch_up_rounds))
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
        if self.open is not None:
            pending = [future for _, future in self.open.pending.values()]
            await asyncio.gather(*pending, return_exceptions=True)

    async def _create_run(self, now: float) -> None:
        run = self.config.run
        self.run_id = secrets.token_hex(8)
        self.created_at = now
        await self._committer.submit(
            partial(storage.create_run, run_id=self.run_id, seed=run.seed, pool_size=run.pool_size,
                    created_at=now))
        if run.model_fingerprint is not None and run.footprint is not None:
            alpha = np.zeros((run.pool_size, run.footprint.num_blocks))
            await self._committer.submit(
                partial(storage.pin_model, fingerprint=run.model_fingerprint,
                        footprint=run.footprint, alpha=alpha))
            self._pin(run.model_fingerprint, run.footprint, alpha)
        log.info("created run %s (seed %d, K=%d)", self.run_id, run.seed, run.pool_size)

    def _restore(self, snap: storage.Snapshot, now: float) -> None:
        run = self.config.run
        if (snap.seed, snap.pool_size) != (run.seed, run.pool_size):
            raise ConfigError(
                f"the database holds run {snap.run_id} with seed={snap.seed}, pool_size="
                f"{snap.pool_size}; the config says seed={run.seed}, pool_size={run.pool_size}. "
                "Restore those values or start a new run with another storage.path"
            )
        pins = (("model_fingerprint", run.model_fingerprint, snap.model_fingerprint),
                ("footprint", run.footprint, snap.footprint))
        for name, ours, theirs in pins:
            if ours is not None and theirs is not None and ours != theirs:
                raise ConfigError(
                    f"run.{name} in the config differs from the one run {snap.run_id} pinned: "
                    "remove it from the config or start a new run with another storage.path"
                )
        self.run_id, self.created_at = snap.run_id or "", snap.created_at
        self.version = snap.version
        if snap.model_fingerprint and snap.footprint is not None and snap.alpha is not None:
            self._pin(snap.model_fingerprint, snap.footprint, snap.alpha)
        self.deltas.extend(snap.deltas)
        for c in snap.clients:
            # Every known client counts as seen at restart: it gets one membership timeout
            # to come back before the schedule drops it.
            self._add_member(Member(c.client_id, c.token_hash, c.profile, c.registered_at,
                                    c.calibration, now, c.profile.step_time_s))
        for r in snap.rounds:
            self.history.append(RoundSummary(
                r.plan.round, r.status, len(r.plan.clients), r.reports, r.plan.opened_at,
                r.closed_at, r.loss, r.message, r.plan.schedule_method))
            if r.status != OPEN:
                self.counters["rounds_applied" if r.status == APPLIED else "rounds_failed"] += 1
        if snap.rounds:
            last = snap.rounds[-1]
            self.round_counter = last.plan.round + 1
            self._previous = {cid: frozenset(p.blocks) for cid, p in last.plan.clients.items()}
            self.last_plan = last.plan
            if last.status == OPEN:
                self.history.pop()
                self.open = OpenRound(last.plan, {r.client_id: r for r in snap.open_reports})
        self.finished = bool(run.max_rounds) and self.version >= run.max_rounds
        log.info("resumed run %s at version %d, round %d%s", self.run_id, self.version,
                 self.round_counter - (self.open is not None),
                 " (open)" if self.open is not None else "")

    def _pin(self, fingerprint: str, footprint: ModelFootprint, alpha: np.ndarray) -> None:
        self.fingerprint, self.footprint, self.alpha = fingerprint, footprint, alpha

    def _add_member(self, member: Member) -> None:
        self.members[member.client_id] = member
        self._by_token[member.token_hash] = member.client_id

    def now(self) -> float:
        return self._clock()

    # ------------------------------------------------------------------------ requests

    def authenticate(self, token: str | None) -> Member:
        if not token:
            raise errors.unauthorized(
                "missing bearer token: send 'Authorization: Bearer <token>' from POST /v1/clients")
        client_id = self._by_token.get(token_hash(token))
        if client_id is None:
            raise errors.unauthorized("unknown bearer token: register again with POST /v1/clients")
        member = self.members[client_id]
        member.last_seen = self._clock()
        return member

    def run_info(self) -> RunInfo:
        run = self.config.run
        assert self.footprint is not None and self.fingerprint is not None
        return RunInfo(
            run_id=self.run_id, seed=self.seed, pool_size=self.pool_size,
            num_blocks=self.footprint.num_blocks, model_fingerprint=self.fingerprint,
            hyper=self.hyper(), round_duration_s=run.round_duration_s,
            poll_timeout_s=run.poll_timeout_s,
            max_abs_scalar=self.config.aggregation.max_abs_scalar, mode=run.mode,
        )

    def hyper(self) -> HyperParams:
        run = self.config.run
        return HyperParams(run.lr, run.mu, run.batch_size, run.seq_len)

    async def register(self, request: RegisterRequest) -> RegisterResponse:
        secret = self.config.enrolment_secret.encode()
        if not hmac.compare_digest(request.enrolment_secret.encode(), secret):
            raise errors.forbidden("wrong enrolment secret: ask the run's operator for it")
        if request.protocol != PROTOCOL_VERSION:
            raise errors.bad_request(
                "protocol_version",
                f"client speaks protocol {request.protocol}, this server {PROTOCOL_VERSION}: "
                "upgrade the older side")
        profile = request.profile
        pins = self.fingerprint is None
        if not pins:
            self._check_model(profile)
        if self.weights is None:  # fedavg runs whatever the budget: its peaks are the finding
            self._check_budget(profile)
        now = self._clock()
        client_id, token = "c-" + secrets.token_hex(8), secrets.token_urlsafe(32)
        member = Member(client_id, token_hash(token), profile, now, 1.0, now, profile.step_time_s)
        insert = partial(storage.insert_client, client_id=client_id, token_hash=member.token_hash,
                         profile=profile, registered_at=now)
        if pins:
            # Pin before awaiting the commit so concurrent registrations compare against it.
            alpha = np.zeros((self.pool_size, profile.footprint.num_blocks))
            self._pin(profile.model_fingerprint, profile.footprint, alpha)

            def op(conn: sqlite3.Connection) -> None:
                storage.pin_model(conn, profile.model_fingerprint, profile.footprint, alpha)
                insert(conn)
        else:
            op = insert
        try:
            await self._committer.submit(op)
        except Exception:
            if pins:
                self.fingerprint = self.footprint = self.alpha = None
            raise
        self._add_member(member)
        self.counters["registrations"] += 1
        self._wake.set()
        return RegisterResponse(client_id, token, self.run_info())

    def _check_model(self, profile: DeviceProfile) -> None:
        if profile.model_fingerprint != self.fingerprint:
            raise errors.conflict(
                "model_mismatch",
                f"this run trains model {self.fingerprint!r}, the client loaded "
                f"{profile.model_fingerprint!r}: load the run's base model",
            )
        if profile.footprint != self.footprint:
            assert self.footprint is not None
            diff = [f for f in ("num_layers", "hidden_size", "vocab_size", "intermediate_size",
                                "embed_head_params", "block_params", "quantizable_block_params")
                    if getattr(profile.footprint, f) != getattr(self.footprint, f)]
            raise errors.conflict(
                "model_mismatch",
                f"the client's model footprint differs from the run's in {', '.join(diff)}: "
                "same fingerprint but another architecture; load the run's base model",
            )

    def _check_budget(self, profile: DeviceProfile) -> None:
        model = self._memory_model(profile, 1.0)
        need = model.fixed_bytes + min(model.block_bytes)
        if profile.memory_budget_bytes < need:
            raise errors.unprocessable(
                "budget_too_small",
                f"training even the cheapest block needs {need / 2**20:.0f} MiB with this run's "
                f"batch_size={self.config.run.batch_size}, seq_len={self.config.run.seq_len}; the "
                f"device offers {profile.memory_budget_bytes / 2**20:.0f} MiB: free memory or hold "
                "frozen blocks in a smaller precision",
            )

    def _memory_model(self, profile: DeviceProfile, calibration: float) -> LinearMemoryModel:
        run = self.config.run
        settings = profile.memory.settings(run.batch_size, run.seq_len, calibration)
        return linear_memory_model(profile.footprint, settings)

    async def next_round(self, member: Member, version: int, wait_s: float) -> NextRound:
        loop = asyncio.get_running_loop()
        end = loop.time() + min(max(wait_s, 0.0), self.config.run.poll_timeout_s)
        while True:
            answer = self._answer(member, version)
            if answer is not None:
                return answer
            remaining = end - loop.time()
            if remaining <= 0:
                deltas, catch_up = self._deltas_since(version)
                return NextRound(WAIT, self.version, None, deltas, catch_up,
                                 retry_after_s=0.0, reason=self._wait_reason(member))
            # asyncio.wait on a plain future: no task per waiting poll (there are thousands).
            await asyncio.wait((self._round_signal(),), timeout=remaining)

    def _answer(self, member: Member, version: int) -> NextRound | None:
        if version > self.version:
            raise errors.conflict(
                "version_ahead",
                f"client is at alpha version {version}, the server at {self.version}: the run was "
                "reset or restored; fetch GET /v1/state and resync",
            )
        if self.finished:
            deltas, catch_up = self._deltas_since(version)
            return NextRound(FINISHED, self.version, None, deltas, catch_up,
                             reason=f"the run finished after {self.version} applied rounds")
        r = self.open
        cid = member.client_id
        if (r is None or r.closing or cid not in r.plan.clients or cid in r.received
                or cid in r.pending or self._clock() >= r.plan.deadline):
            return None
        deltas, catch_up = self._deltas_since(version)
        return NextRound(TRAIN, self.version, r.plan.assignment_for(cid, self._clock()),
                         deltas, catch_up)

    def _deltas_since(self, version: int) -> tuple[tuple[AlphaDelta, ...], bool]:
        gap = self.version - version
        if gap <= 0:
            return (), False
        if gap > len(self.deltas):
            return (), True
        return tuple(self.deltas)[-gap:], False

    def _wait_reason(self, member: Member) -> str:
        r = self.open
        if r is not None:
            cid = member.client_id
            if cid in r.received or cid in r.pending:
                return f"your report for round {r.plan.round} is in; waiting for the round to close"
            if cid in r.plan.excluded:
                return f"the scheduler left you out of round {r.plan.round}: {r.plan.excluded[cid]}"
            return f"round {r.plan.round} is running without you; you join the next round"
        return self.idle_reason

    async def submit_report(self, member: Member, round_: int, report: Report) -> ReportAck:
        cid = member.client_id
        digest = report_hash(round_, report)
        r = self.open
        if r is None or r.plan.round != round_:
            return await self._report_for_other_round(member, round_, report, digest)
        prior = r.received.get(cid) or (r.pending[cid][0] if cid in r.pending else None)
        if prior is not None:
            if prior.report.idempotency_key != report.idempotency_key:
                raise errors.conflict(
                    "already_reported",
                    f"client {cid} already reported for round {round_} (key "
                    f"{prior.report.idempotency_key!r}); one report per round")
            if prior.body_hash != digest:
                raise _idempotency_conflict(report.idempotency_key)
            if cid in r.pending:
                try:
                    await asyncio.shield(r.pending[cid][1])
                except sqlite3.IntegrityError:
                    raise _idempotency_conflict(report.idempotency_key) from None
            return _ack(round_, prior)
        now = self._clock()
        if r.closing or now >= r.plan.deadline:
            raise _round_closed(round_)
        check_report(r.plan, cid, report, max_abs_scalar=self.config.aggregation.max_abs_scalar,
                     weights_only=self.weights is not None)
        if self.weights is not None and not self.weights.has_upload(round_, cid):
            raise errors.conflict(
                "weights_missing", f"round {round_} is a fedavg round: PUT the trained weights to "
                f"/v1/rounds/{round_}/weights before reporting")
        received = ReceivedReport(cid, report, digest, now)
        committed = self._committer.enqueue(
            partial(storage.insert_report, round_=round_, received=received))
        # Registered before anyone awaits the future, so it runs first when the commit
        # lands: the round's book is updated before any waiter (a close) looks at it.
        committed.add_done_callback(partial(self._report_committed, r, received))
        r.pending[cid] = (received, committed)
        try:
            await asyncio.shield(committed)
        except sqlite3.IntegrityError:
            # (client, key) was used in an earlier round: nothing was stored.
            raise _idempotency_conflict(report.idempotency_key) from None
        return _ack(round_, received)

    def _report_committed(self, r: OpenRound, received: ReceivedReport,
                          committed: asyncio.Future[None]) -> None:
        cid = received.client_id
        r.pending.pop(cid, None)
        if committed.cancelled() or committed.exception() is not None:
            return
        r.received[cid] = received
        member = self.members[cid]
        member.rounds_reported += 1
        member.last_loss = received.report.loss_mean
        member.last_peak_bytes = received.report.peak_memory_bytes
        if received.report.step_time_s > 0:
            member.step_time_s = received.report.step_time_s
        self.counters["reports_accepted"] += 1
        if r.complete():
            self._wake.set()

    async def _report_for_other_round(self, member: Member, round_: int, report: Report,
                                      digest: bytes) -> ReportAck:
        found = await self._committer.submit(
            partial(storage.find_report, client_id=member.client_id,
                    idempotency_key=report.idempotency_key))
        if found is not None:
            stored_round, stored_hash, received_at = found
            if stored_round == round_ and stored_hash == digest:
                return ReportAck(round_, report.idempotency_key, received_at)
            raise _idempotency_conflict(report.idempotency_key)
        current = self.open.plan.round if self.open is not None else self.round_counter - 1
        if round_ > current or round_ < 1:
            raise errors.not_found(
                "unknown_round", f"round {round_} does not exist (current round: {current})")
        raise _round_closed(round_)

    async def receive_weights(self, member: Member, round_: int,
                              chunks: AsyncIterable[bytes]) -> int:
        """fedavg: a client's trained weights for the open round (before its report)."""
        store = self._weight_store()
        cid = member.client_id
        r = self.open
        if r is None or r.plan.round != round_ or r.closing or self._clock() >= r.plan.deadline:
            raise _round_closed(round_)
        if cid not in r.plan.clients:
            raise errors.conflict("not_assigned",
                                  f"client {cid} has no assignment in round {round_}")
        if cid in r.received or cid in r.pending:
            raise errors.conflict("already_reported",
                                  f"client {cid} already reported for round {round_}")
        assert self.footprint is not None
        return await store.receive(round_, cid, chunks, self.footprint)

    def weights_file(self) -> tuple[Path, int]:
        """fedavg: the current global weights and their version (404 at version 0)."""
        store = self._weight_store()
        path = store.version_file(self.version)
        if path is None:
            raise errors.not_found(
                "no_weights", f"alpha version {self.version} has no averaged weights: version 0 "
                "is the base model, which every client loads itself")
        return path, self.version

    def _weight_store(self) -> WeightStore:
        if self.weights is None:
            raise errors.not_found(
                "not_fedavg", f"this run's mode is {self.config.run.mode!r}: weights are "
                "exchanged only in the fedavg baseline")
        return self.weights

    def state(self) -> bytes:
        """The encoded AlphaState (cached per version: catch-up storms share one encoding)."""
        if self.alpha is None or self.footprint is None:
            raise errors.conflict(
                "model_not_pinned", "no client has registered a model yet: the table has no shape")
        if self._state_cache is None or self._state_cache[0] != self.version:
            body = encode(AlphaState(self.run_id, self.version, self.pool_size,
                                     self.footprint.num_blocks,
                                     np.ascontiguousarray(self.alpha, dtype="<f8").tobytes()))
            self._state_cache = (self.version, body)
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
            timeout = IDLE_RECHECK_S
            if self.open is not None and not self.open.closing:
                timeout = max(0.0, self.open.plan.deadline - self._clock())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _advance(self) -> None:
        r = self.open
        if r is not None and (r.complete() or self._clock() >= r.plan.deadline or r.closing):
            await self._close(r)
        if self.open is None and not self.finished:
            await self._try_open()

    def active_members(self, now: float) -> list[Member]:
        horizon = now - self.config.run.membership_timeout_s
        return [m for m in self.members.values() if m.last_seen >= horizon]

    async def _try_open(self) -> None:
        if self.footprint is None:
            self.idle_reason = "waiting for the first client to register (the model is not pinned)"
            return
        now = self._clock()
        members = self.active_members(now)
        need = self.config.run.min_clients
        if len(members) < need:
            self.idle_reason = (f"waiting for clients: {len(members)} active, {need} needed "
                                "to open a round")
            return
        schedule = await self._schedule(members)
        if schedule is None or not schedule.assignments:
            return
        run = self.config.run
        if len(schedule.assignments) < run.min_reports:
            # Such a round could only fail: wait for more clients instead.
            self.idle_reason = (
                f"the scheduler admitted {len(schedule.assignments)} clients, fewer than "
                f"min_reports={run.min_reports}: waiting for more clients")
            return
        clients = {
            m.client_id: ClientPlan(
                schedule.assignments[m.client_id],
                local_steps(m.step_time_s, self._compute_time_s(), min_steps=run.min_steps,
                            max_steps=run.max_steps))
            for m in members if m.client_id in schedule.assignments
        }
        longest = max(p.num_steps for p in clients.values())
        plan = RoundPlan(
            round=self.round_counter, base_version=self.version, opened_at=now,
            deadline=now + run.round_duration_s, hyper=self.hyper(),
            pool_indices=round_pool_indices(self.seed, self.round_counter, longest, self.pool_size),
            clients=clients, excluded=dict(schedule.excluded_clients),
            uncovered_blocks=tuple(sorted(schedule.uncovered_blocks)),
            schedule_method=schedule.method,
        )
        await self._committer.submit(partial(storage.insert_round, plan=plan))
        self.open = OpenRound(plan)
        self.round_counter += 1
        self._notify()
        log.info("round %d open: %d clients, deadline in %.0f s", plan.round, len(clients),
                 run.round_duration_s)

    def _compute_time_s(self) -> float:
        # The client also syncs, reports and waits on the network inside the round.
        return self.config.run.round_duration_s * self.config.run.compute_fraction

    async def _schedule(self, members: list[Member]) -> Schedule | None:
        """Reuse the last schedule unless membership (or a calibration band) changed."""
        key = tuple(sorted((m.client_id, round(math.log(m.calibration, CALIBRATION_STEP)))
                           for m in members))
        if key == self._schedule_key:
            last = self.last_schedule
            return last if last is not None and last.assignments else None
        assert self.footprint is not None
        specs = [
            ClientSpec(m.client_id,
                       int(m.profile.memory_budget_bytes * (1 - self.config.run.memory_headroom)),
                       self._memory_model(m.profile, m.calibration), float(m.profile.num_samples),
                       m.step_time_s, self._previous.get(m.client_id, frozenset()))
            for m in members
        ]
        run = self.config.run
        sched_config = dataclasses.replace(
            self.config.scheduler, round_deadline_s=self._compute_time_s(),
            min_steps=run.min_steps, max_steps=run.max_steps)
        started = time.perf_counter()
        schedule = await asyncio.to_thread(self._solve, specs, self.footprint.block_params,
                                           sched_config)
        self.schedule_solve_s = time.perf_counter() - started
        self.counters["schedules_solved"] += 1
        self._schedule_key, self.last_schedule = key, schedule
        if not schedule.assignments:
            reasons = "; ".join(f"{cid}: {why}"
                                for cid, why in sorted(schedule.excluded_clients.items()))
            self.idle_reason = f"the scheduler admitted no client ({reasons})"
            return None
        return schedule

    async def _close(self, r: OpenRound) -> None:
        r.closing = True
        pending = [future for _, future in r.pending.values()]
        await asyncio.gather(*pending, return_exceptions=True)
        plan = r.plan
        weights = {cid: float(self.members[cid].profile.num_samples) for cid in plan.clients}
        outcome = close_round(plan, r.received, weights, min_reports=self.config.run.min_reports,
                              aggregation=self.config.aggregation)
        now = self._clock()
        delta_msg, alpha = None, None
        if outcome.status == APPLIED:
            assert outcome.delta is not None and self.alpha is not None
            d = outcome.delta
            delta_msg = AlphaDelta.from_matrix(self.version + 1, plan.round, d.pool_indices,
                                               d.blocks, d.values)
            alpha = apply_delta(self.alpha, d)
            if self.weights is not None:
                # Written before the close commits: a version never exists without its weights.
                uploads = [Upload(cid, self.weights.upload_path(plan.round, cid), weights[cid])
                           for cid in sorted(r.received)]
                await asyncio.to_thread(self.weights.average, uploads, self.version + 1)
        calibrations = self._calibrations(plan, r.received)
        await self._committer.submit(partial(
            storage.close_round, round_=plan.round, status=outcome.status, closed_at=now,
            reports=outcome.reports, loss=outcome.loss, message=outcome.message, delta=delta_msg,
            alpha=alpha, calibrations=calibrations))
        self._after_close(r, outcome, delta_msg, alpha, calibrations, now)
        if self.weights is not None:
            self.weights.discard_round(plan.round)
            self.weights.prune_versions(self.version)

    def _after_close(self, r: OpenRound, outcome: RoundOutcome, delta: AlphaDelta | None,
                     alpha: np.ndarray | None, calibrations: dict[str, float], now: float) -> None:
        plan = r.plan
        if delta is not None and alpha is not None:
            self.alpha, self.version = alpha, delta.version
            self.deltas.append(delta)
            self.counters["rounds_applied"] += 1
        else:
            self.counters["rounds_failed"] += 1
        for cid, calibration in calibrations.items():
            self.members[cid].calibration = calibration
        self._previous = {cid: frozenset(p.blocks) for cid, p in plan.clients.items()}
        self.last_plan = plan
        self.history.append(RoundSummary(plan.round, outcome.status, len(plan.clients),
                                         outcome.reports, plan.opened_at, now, outcome.loss,
                                         outcome.message, plan.schedule_method))
        self.open = None
        max_rounds = self.config.run.max_rounds
        if max_rounds and self.version >= max_rounds:
            self.finished = True
            self.idle_reason = f"the run finished after {self.version} applied rounds"
            self._notify()
        log.info("round %d %s: %s", plan.round, outcome.status, outcome.message)

    def _calibrations(self, plan: RoundPlan,
                      received: dict[str, ReceivedReport]) -> dict[str, float]:
        out = {}
        for cid, rec in received.items():
            peak = rec.report.peak_memory_bytes
            if peak <= 0:
                continue
            member = self.members[cid]
            predicted = self._memory_model(member.profile, 1.0).total(plan.clients[cid].blocks)
            ratio = peak / predicted
            # An under-estimate is corrected at once (the next plan must fit); an
            # over-estimate only decays, so one lucky round cannot over-fill a device.
            value = max(ratio, (1 - CALIBRATION_EMA) * member.calibration + CALIBRATION_EMA * ratio)
            out[cid] = min(max(value, CALIBRATION_MIN), CALIBRATION_MAX)
        return out

    def _round_signal(self) -> asyncio.Future[None]:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def _notify(self) -> None:
        """Wake every long-poll: a round opened or the run finished."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    # ------------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        now = self._clock()
        active = {m.client_id for m in self.active_members(now)}
        r = self.open
        plan = r.plan if r is not None else None
        current: dict[str, Any] | None = None
        if plan is not None and r is not None:
            current = {
                "round": plan.round, "base_version": plan.base_version,
                "deadline_in_s": max(0.0, plan.deadline - now), "assigned": len(plan.clients),
                "reported": len(r.received), "pending": len(r.pending),
                "excluded": dict(plan.excluded), "uncovered_blocks": list(plan.uncovered_blocks),
                "schedule_method": plan.schedule_method,
            }
        num_blocks = self.footprint.num_blocks if self.footprint else 0
        coverage = [0] * num_blocks
        shown = plan or self.last_plan
        for p in (shown.clients.values() if shown else ()):
            for b in p.blocks:
                coverage[b] += 1
        return {
            "run_id": self.run_id, "mode": self.config.run.mode, "seed": self.seed,
            "pool_size": self.pool_size,
            "num_blocks": num_blocks, "model_fingerprint": self.fingerprint,
            "version": self.version, "finished": self.finished,
            "state": "round open" if r is not None else self.idle_reason,
            "current_round": current,
            "block_coverage": coverage,
            "clients": [
                {"client_id": m.client_id, "name": m.profile.name,
                 "device": m.profile.device_type, "budget_bytes": m.profile.memory_budget_bytes,
                 "num_samples": m.profile.num_samples,
                 "active": m.client_id in active, "last_seen_s": now - m.last_seen,
                 "calibration": m.calibration, "step_time_s": m.step_time_s,
                 "rounds_reported": m.rounds_reported, "last_loss": m.last_loss,
                 "blocks": list(plan.clients[m.client_id].blocks)
                 if plan is not None and m.client_id in plan.clients else []}
                for m in sorted(self.members.values(), key=lambda m: m.registered_at)
            ],
            "rounds": [
                {"round": h.round, "status": h.status, "assigned": h.assigned, "reports": h.reports,
                 "loss": h.loss, "message": h.message, "opened_at": h.opened_at,
                 "closed_at": h.closed_at, "schedule_method": h.method}
                for h in self.history[-STATUS_ROUNDS:]
            ],
            "counters": dict(self.counters),
        }



def _ack(round_: int, received: ReceivedReport) -> ReportAck:
    return ReportAck(round_, received.report.idempotency_key, received.received_at)


def _round_closed(round_: int) -> errors.ApiError:
    return errors.conflict(
        "round_closed",
        f"round {round_} closed: its reports were aggregated without this one; poll "
        "GET /v1/rounds/next for the next round",
    )


def _idempotency_conflict(key: str) -> errors.ApiError:
    return errors.conflict(
        "idempotency_conflict",
        f"idempotency key {key!r} was already used for a different report: a retry must resend "
        "the same report, a new report needs a new key",
    )

