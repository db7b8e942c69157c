"""The client daemon: join the run, then poll, sync, train and report until the run finishes.

    join     register (or rejoin with the saved token, resuming from the saved alpha)
    poll     GET /v1/rounds/next?version=v (a long-poll)
    sync     apply the deltas it brings, or catch up from GET /v1/state
    train    the assignment's local steps, in a worker thread (the event loop stays free),
             between the run mode's hooks (zorba_edge/client/modes: what it fetches before
             and uploads after)
    report   POST the scalars with an idempotency key that its retries keep

Stopping (SIGTERM/SIGINT, or `request_stop`) is clean at every point: a poll is simply
dropped; a round in training is cancelled between steps, the trainer reverts its local
steps, and nothing is reported; a report already on the wire gets a short grace period to
be acknowledged. The server commits a report whole or not at all, so either it has all of
the round or none of it; a restarted client asks the server which. State is saved on the way out,
and the server is told the client leaves (POST /v1/leave, one short try), so its rounds stop
counting on this client at once; a restarted client is active again at its first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from zorba_common.errors import InvalidScalarError
from zorba_common.messages import (
    FINISHED,
    WAIT,
    Assignment,
    NextRound,
    RegisterRequest,
    Report,
    ReportAck,
    RunInfo,
)
from zorba_edge.client.admission import AssignmentCheck
from zorba_edge.client.byte_sizes import format_size
from zorba_edge.client.errors import ServerRefusedError, ServerUnavailableError, UsageError
from zorba_edge.client.modes import CLIENT_MODES
from zorba_edge.client.modes.client_mode import RoundHooks, Trainer
from zorba_edge.client.profiling import PROFILE_STEP_FORWARDS
from zorba_edge.client.state import ClientState, StateStore
from zorba_edge.client.trainer import LocalRoundResult, SyncError, finish_by
from zorba_edge.client.transport import ServerClient
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.progress import Progress

log = logging.getLogger("zorba_edge.client")
T = TypeVar("T")

SIT_OUT_SLACK_S = 0.2
"""After a round's deadline, before polling again: the server closes it by then."""


MakeTrainer = Callable[[RunInfo, CoefficientTable | None, Progress | None], Trainer]
"""(run, saved table or None, progress of the model's loading) -> a trainer holding its model.
Called in a worker thread."""
MakeRegistration = Callable[[Progress | None], RegisterRequest]
"""(progress of the timing probe) -> the registration, the device profiled. Called in a
worker thread."""
CheckRun = Callable[[RunInfo], None]
"""Raises (BudgetError, UsageError) when this device cannot take part in `run`."""
CheckMemory = Callable[[RunInfo], AssignmentCheck | None]
"""(run) -> the check of its assignments against this device's memory budget, or None where
the run mode keeps no budget (every block trains whatever it costs)."""


def step_estimate_s(last_step_s: float, forward_s: float, step_forwards: float) -> float:
    """Seconds per local step before a round's first: the last round's (`last_step_s`, 0 before
    any), else the probe's forward times the forwards a step costs (`step_forwards`, the run
    mode's `RoundHooks.step_forwards`). The profile's step is an antithetic one, two forwards;
    a one-sided batch of 4 directions costs 1.25 a step, and judging its batches by the
    profile's kept every quickstart client out of its first round."""
    if last_step_s > 0:
        return last_step_s
    return forward_s * step_forwards


def next_step_estimate_s(last_step_s: float, measured_step_s: float) -> float:
    """The seconds per step the next round's gate starts from: this round's measured time where
    it took a step (`measured_step_s` > 0), else half the last estimate.

    Only a step taken measures the time again, and the gate refuses a first batch its estimate
    says would not end in time: a client whose estimate was once inflated (a busy machine: 6 s a
    step, so a batch of 4 no longer fit after the round's check forwards) kept it for good and
    sat out 32 of a 20-minute run's 37 rounds (2026-12-07). Halved after every round without a
    step, the estimate lets the client try a batch again within a few rounds, and that batch
    measures the real time."""
    return measured_step_s if measured_step_s > 0 else last_step_s / 2


def step_budget_s(deadline_in_s: float, margin_s: float, report_s: float,
                  upload_s: float = 0.0) -> float:
    """Seconds of a round the local steps may take: what is left once the report can still
    reach the server before the deadline.

    A step in progress runs to its end, and the report (and the run mode's upload after
    training) must land before the deadline too: steps start only while they should end in
    time (the trainer's gate), and the plan keeps free the larger of the margin and twice the
    last report's round trip (its upload and the server's store; issue 26 saw a client that had
    done all 46 of its steps lose its report at the deadline), plus twice the mode's upload
    (`upload_s`, `RoundHooks.upload_s`: without it 2 of 3 Gemma 3 clients' whole rounds
    arrived late). Each reserve is at most half the round: a slower device cannot make any round
    anyway. The server also takes reports for run.report_grace_s after the deadline, for one
    on its way all the same."""
    half = deadline_in_s / 2
    return deadline_in_s - max(margin_s, min(2 * report_s, half)) - min(2 * upload_s, half)


@dataclass(frozen=True)
class DaemonSettings:
    budget_bytes: int
    """The declared memory budget: a round whose peak passes it is logged as a warning."""
    deadline_margin_s: float = 1.0
    """Stop local steps this long before the round's deadline, to leave time for the report."""
    report_grace_s: float = 15.0
    """On a stop, how long a report already being posted may take to be acknowledged."""
    stop_after_rounds: int | None = None
    """Leave after this many acknowledged reports (None: stay until the run finishes)."""
    leave_timeout_s: float = 2.0
    """On a stop, how long telling the server that this client leaves may take."""


@dataclass(frozen=True)
class RoundSummary:
    """One round as this client saw it."""

    round: int
    base_version: int
    blocks: tuple[int, ...]
    steps: int
    planned_steps: int
    loss_mean: float
    loss_last: float
    peak_memory_bytes: int
    step_time_s: float
    status: str
    """`reported`; not reported: `abandoned` (stopping), `late` (the round closed first),
    `refused`, `empty` (no step before the deadline), `skipped` (too close to the deadline),
    `declined` (its blocks do not fit this device's budget: not loaded)."""


class Listener:
    """Progress callbacks (the CLI draws them); the default does nothing."""

    def on_status(self, text: str) -> None:
        """What the daemon is doing now: waiting, syncing, training round r..."""

    def on_round(self, summary: RoundSummary) -> None:
        """A round ended (reported or not)."""

    def progress(self, what: str) -> Progress | None:
        """A callback for the progress of one slow step (`what`: loading the model...), or
        None to not follow it. Called from worker threads."""
        return None


@dataclass(frozen=True)
class DaemonResult:
    reason: str
    """`finished` (the run is over), `stopped` (signal or request), `rounds` (stop_after_rounds)."""
    rounds_reported: int
    version: int


class _Rejoin(Exception):
    """The server no longer knows our token: register again."""


class ClientDaemon:
    def __init__(self, client: ServerClient, store: StateStore, *,
                 make_registration: MakeRegistration, make_trainer: MakeTrainer,
                 check_run: CheckRun, settings: DaemonSettings,
                 listener: Listener | None = None,
                 check_memory: CheckMemory | None = None) -> None:
        self._client = client
        self._store = store
        self._make_registration = make_registration
        self._make_trainer = make_trainer
        self._check_run = check_run
        self._check_memory = check_memory
        self.settings = settings
        self._listener = listener or Listener()
        self._stop: asyncio.Event | None = None
        self._cancel: threading.Event | None = None
        self.state: ClientState | None = None
        self.trainer: Trainer | None = None
        self._hooks = RoundHooks()
        """The run mode's part of each round (zorba_edge/client/modes), one per trainer."""
        self.rounds_reported = 0
        self._report_s = 0.0
        """How long the last report took to be acknowledged (its upload and the server's
        store): kept free before the deadline."""
        self._last_step_s = 0.0
        """The last round's time per local step (0 before the first: `step_estimate_s`)."""
        self._forward_s = 0.0
        """The timing probe's forward pass (0 when resumed without a probe)."""

    # ------------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Stop soon and cleanly; safe to call from a signal handler on the event loop."""
        if self._stop is not None:
            self._stop.set()
        if self._cancel is not None:
            self._cancel.set()

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    @property
    def version(self) -> int:
        return self.trainer.table.version if self.trainer is not None else 0

    async def run(self) -> DaemonResult:
        self._stop = asyncio.Event()
        reason = "stopped"
        try:
            await self._join(force_register=False)
            while not self.stopping:
                try:
                    outcome = await self._cycle()
                except _Rejoin:
                    await self._join(force_register=True)
                    continue
                if outcome != "continue":
                    reason = outcome
                    break
        finally:
            self._save()
            if self.stopping and self.state is not None:
                await self._leave()
        return DaemonResult(reason, self.rounds_reported, self.version)

    async def _leave(self) -> None:
        """Best effort: a server that hears it stops counting this client as active at once
        (rounds need not wait for it); one that does not, after its membership timeout."""
        try:
            await self._client.leave(self.settings.leave_timeout_s)
            log.info("told the server this client leaves")
        except (ServerRefusedError, ServerUnavailableError, UsageError, asyncio.TimeoutError,
                OSError) as exc:
            log.info("could not tell the server this client leaves (%s); it will count it gone "
                     "after its membership timeout", exc)

    # ------------------------------------------------------------------------ joining

    async def _join(self, *, force_register: bool) -> None:
        url = self._client.base_url
        saved = None if force_register else self._store.load()
        if saved is not None and saved.server_url != url:
            raise UsageError(
                f"{self._store.path} belongs to a client of {saved.server_url}, not {url}: "
                "pass another --state file for this server (or delete that one)")
        # Drop the old trainer (and its model) before building a new one.
        self.trainer = None
        if saved is not None:
            self._check_run(saved.run)
            self.state = saved
            self._client.token = saved.token
            table = self._store.load_table(saved)
            log.info("rejoining as %s (run %s, local alpha version %s)", saved.client_id,
                     saved.run.run_id, table.version if table is not None else "none: catching up")
        else:
            self._listener.on_status("profiling the device")
            request = await asyncio.to_thread(
                self._make_registration,
                self._listener.progress("timing probe (loading, then forward passes)"))
            self._forward_s = request.profile.step_time_s / PROFILE_STEP_FORWARDS
            self._listener.on_status(f"registering with {url}")
            response = await self._until_stop(self._client.register(request))
            if response is None:
                return
            self._check_run(response.run)
            self._client.token = response.token
            self.state = self._store.save(ClientState(url, response.client_id, response.token,
                                                      response.run))
            table = None
            log.info("registered as %s in run %s (%d blocks, pool of %d seeds)",
                     response.client_id, response.run.run_id, response.run.num_blocks,
                     response.run.pool_size)
        assert self.state is not None
        # Minutes for a large model on a small device; resuming, it also replays alpha.
        self._listener.on_status("loading the model")
        self.trainer = await asyncio.to_thread(self._make_trainer, self.state.run, table,
                                               self._listener.progress("loading the model"))
        self._hooks = CLIENT_MODES[self.state.run.mode].round_hooks(self.trainer)
        self._save()

    # ------------------------------------------------------------------------ one cycle

    async def _cycle(self) -> str:
        """One poll and what follows it; returns `continue` or why the daemon ends."""
        assert self.state is not None and self.trainer is not None
        self._listener.on_status(f"waiting for a round (alpha version {self.version})")
        try:
            answer = await self._until_stop(
                self._client.next_round(self.version, self.state.run.poll_timeout_s))
        except ServerRefusedError as exc:
            if exc.status == 401:
                log.warning("the server no longer knows this client (%s): registering again",
                            exc.server_message)
                raise _Rejoin from None
            if exc.code == "version_ahead":
                log.warning("%s: catching up from the server's table", exc.server_message)
                await self._catch_up()
                return "continue"
            raise
        if answer is None:
            return "stopped"
        await self._sync(answer)
        if self.stopping:
            return "stopped"
        if answer.status == FINISHED:
            log.info("the run is finished (%s)", answer.reason)
            return "finished"
        if answer.status == WAIT or answer.assignment is None:
            if answer.reason:
                self._listener.on_status(f"waiting: {answer.reason}")
            if answer.retry_after_s > 0:
                await self._sleep(answer.retry_after_s)
            return "continue"
        if self.version != answer.assignment.base_version:
            # The deltas should have brought us there; the whole table certainly does.
            log.warning("round %d trains on version %d, this client is at %d: catching up",
                        answer.assignment.round, answer.assignment.base_version, self.version)
            await self._catch_up()
            return "continue"
        await self._train_and_report(answer.assignment)
        stop_after = self.settings.stop_after_rounds
        if stop_after is not None and self.rounds_reported >= stop_after:
            return "rounds"
        return "continue"

    async def _sync(self, answer: NextRound) -> None:
        assert self.trainer is not None
        if answer.catch_up:
            await self._catch_up()
            return
        if not answer.deltas:
            return
        what = f"syncing {len(answer.deltas)} round(s) of alpha"
        self._listener.on_status(what)
        # Every round syncs one: only a client that fell behind waits long enough to follow.
        progress = self._listener.progress(what) if len(answer.deltas) > 1 else None
        try:
            await asyncio.to_thread(self.trainer.apply_deltas, answer.deltas, progress)
        except SyncError as exc:
            log.warning("%s", exc)
            await self._catch_up()
            return
        self._save()

    async def _catch_up(self) -> None:
        assert self.trainer is not None and self.state is not None
        self._listener.on_status("catching up: fetching the whole alpha table")
        state = await self._until_stop(self._client.state())
        if state is None:
            return
        if state.run_id != self.state.run.run_id:
            log.warning("the server now runs %s, not %s: registering again", state.run_id,
                        self.state.run.run_id)
            raise _Rejoin
        # Rebuilds every held block from base + its whole alpha column.
        await asyncio.to_thread(self.trainer.replace_table, state,
                                self._listener.progress("catching up: rebuilding the blocks"))
        log.info("caught up to alpha version %d", state.version)
        self._save()

    # ------------------------------------------------------------------------ a round

    async def _train_and_report(self, assignment: Assignment) -> None:
        assert self.trainer is not None and self.state is not None
        loop = asyncio.get_running_loop()
        deadline_at = loop.time() + assignment.deadline_in_s
        memory = self._check_memory(self.state.run) if self._check_memory is not None else None
        refusal = memory.refusal(assignment, self.state.memory_floor) if memory is not None else None
        if refusal is not None:
            log.warning("round %d declined: %s", assignment.round, refusal)
            self._notify(assignment, None, "declined")
            await self._sit_out(deadline_at)
            return
        budget_s = step_budget_s(
            assignment.deadline_in_s, self.settings.deadline_margin_s, self._report_s,
            self._hooks.upload_s())
        if budget_s <= 0:
            log.warning("round %d: only %.1f s left before its deadline; sitting it out",
                        assignment.round, assignment.deadline_in_s)
            self._notify(assignment, None, "skipped")
            await self._sit_out(deadline_at)
            return
        cancel = threading.Event()
        self._cancel = cancel
        timer = loop.call_later(budget_s, cancel.set)  # a backstop: the gate below stops first
        if self.stopping:
            cancel.set()
        blocks = ", ".join(map(str, assignment.blocks))
        self._listener.on_status(f"training round {assignment.round}: blocks [{blocks}], "
                                 f"{len(assignment.pool_indices)} steps")
        try:
            if not await self._hooks.before_training(assignment, self):
                await self._sit_out(deadline_at)
                return
            step_s = step_estimate_s(self._last_step_s, self._forward_s,
                                     self._hooks.step_forwards(assignment.hyper))
            gate = finish_by(time.monotonic() + budget_s, step_s)
            outcome = await asyncio.to_thread(self.trainer.train_round, assignment, cancel, gate)
        except InvalidScalarError as exc:
            log.error("round %d: local training diverged (%s); nothing reported",
                      assignment.round, exc)
            await self._sit_out(deadline_at)
            return
        except SyncError as exc:
            log.warning("round %d: %s", assignment.round, exc)
            await self._catch_up()
            return
        finally:
            timer.cancel()
            self._cancel = None
        self._check_peak(assignment, outcome)
        self._last_step_s = next_step_estimate_s(self._last_step_s, outcome.step_time_s)
        if self.stopping:
            log.info("round %d abandoned: stopping (local steps reverted, nothing reported)",
                     assignment.round)
            self._notify(assignment, outcome, "abandoned")
            return
        if not outcome.trained:
            log.warning("round %d: no local step finished before the deadline; nothing reported",
                        assignment.round)
            self._notify(assignment, outcome, "empty")
            await self._sit_out(deadline_at)
            return
        if outcome.steps_taken < len(assignment.pool_indices):
            log.warning("round %d: %d of %d steps fit before the deadline; reporting those",
                        assignment.round, outcome.steps_taken, len(assignment.pool_indices))
        if outcome.shrunk_batches:
            log.info("round %d: %d batch step(s) longer than the trust radius (%g of the "
                     "weights' RMS) were scaled down to it", assignment.round,
                     outcome.shrunk_batches, assignment.hyper.trust_radius)
        try:
            ended = await self._hooks.after_training(assignment, outcome, self)
        except ServerRefusedError as exc:
            if exc.status == 401:
                raise _Rejoin from None
            raise
        if ended is not None:
            self._notify(assignment, outcome, ended)
            return
        posted_at = loop.time()
        report = outcome.report(assignment, uuid.uuid4().hex)
        status = await self._post_report(assignment.round, report)
        if status == "reported":
            self.rounds_reported += 1
            self._report_s = loop.time() - posted_at
            if memory is not None and outcome.peak_memory_bytes > 0:
                # The server's calibration has now seen this ratio (AssignmentCheck).
                ratio = memory.peak_ratio(assignment, outcome.peak_memory_bytes)
                if ratio < self.state.memory_floor:
                    self.state = dataclasses.replace(self.state, memory_floor=ratio)
        self._notify(assignment, outcome, status)

    async def _post_report(self, round_: int, report: Report) -> str:
        self._listener.on_status(f"reporting round {round_}")
        post: asyncio.Task[ReportAck] = asyncio.ensure_future(self._client.report(round_, report))
        try:
            await self._first_of(post)
            if not post.done():
                # Stopping: the report is whole and on its way; let it land if it can.
                await asyncio.wait({post}, timeout=self.settings.report_grace_s)
            if not post.done():
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await post
                log.warning("round %d: stopping before the report was acknowledged; the server "
                            "has all of it or none (it commits reports whole)", round_)
                return "abandoned"
            ack = post.result()
        except ServerRefusedError as exc:
            if exc.status == 401:
                raise _Rejoin from None
            if exc.code in ("round_closed", "unknown_round"):
                log.warning("round %d closed before the report arrived: %s", round_,
                            exc.server_message)
                return "late"
            log.error("round %d: report refused: %s", round_, exc)
            return "refused"
        log.info("round %d reported: %d samples, loss %.4f (ack at %.0f)", round_,
                 report.num_samples, report.loss_mean, ack.received_at)
        return "reported"

    def _check_peak(self, assignment: Assignment, outcome: LocalRoundResult) -> None:
        budget = self.settings.budget_bytes
        if outcome.peak_memory_bytes > budget:
            log.warning(
                "round %d peaked at %s, over the declared budget of %s (blocks %s): the server "
                "recalibrates from this report; lower --memory-budget if the device suffered",
                assignment.round, format_size(outcome.peak_memory_bytes), format_size(budget),
                list(assignment.blocks))

    async def _sit_out(self, deadline_at: float) -> None:
        """Wait out a round this client cannot report: polling again would hand it back."""
        remaining = deadline_at - asyncio.get_running_loop().time()
        await self._sleep(max(remaining, 0.0) + SIT_OUT_SLACK_S)

    def _notify(self, assignment: Assignment, outcome: LocalRoundResult | None, status: str) -> None:
        nan = float("nan")
        self._listener.on_round(RoundSummary(
            round=assignment.round, base_version=assignment.base_version,
            blocks=assignment.blocks, steps=outcome.steps_taken if outcome else 0,
            planned_steps=len(assignment.pool_indices),
            loss_mean=outcome.loss_mean if outcome else nan,
            loss_last=outcome.loss_last if outcome else nan,
            peak_memory_bytes=outcome.peak_memory_bytes if outcome else 0,
            step_time_s=outcome.step_time_s if outcome else 0.0, status=status))

    # ------------------------------------------------------------------------ plumbing
    # What a run mode's round hooks use of the daemon (modes.RoundIO).

    @property
    def client(self) -> ServerClient:
        return self._client

    def on_status(self, text: str) -> None:
        self._listener.on_status(text)

    async def until_stop(self, awaitable: Awaitable[T]) -> T | None:
        return await self._until_stop(awaitable)

    def _save(self) -> None:
        if self.state is not None:
            table = self.trainer.table if self.trainer is not None else None
            self.state = self._store.save(self.state, table)

    async def _first_of(self, task: asyncio.Future[T]) -> None:
        """Wait until `task` is done or a stop is requested, whichever comes first."""
        assert self._stop is not None
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {task, stop}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def _until_stop(self, awaitable: Awaitable[T]) -> T | None:
        """The awaitable's result, or None (it is cancelled) when a stop comes first."""
        task = asyncio.ensure_future(awaitable)
        await self._first_of(task)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _sleep(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds > 0:
            await self._until_stop(asyncio.sleep(seconds))


def describe_summary(summary: RoundSummary) -> str:
    """One line per round, for logs and the foreground display."""
    loss = "-" if math.isnan(summary.loss_mean) else f"{summary.loss_mean:.4f}"
    return (f"round {summary.round:>4}  {summary.status:<9} v{summary.base_version:<5} "
            f"blocks {list(summary.blocks)}  {summary.steps}/{summary.planned_steps} steps  "
            f"loss {loss}  peak {format_size(summary.peak_memory_bytes)}  "
            f"{summary.step_time_s:.3f} s/step")


__all__ = [
    "ClientDaemon", "DaemonResult", "DaemonSettings", "Listener", "RoundSummary", "Trainer",
    "describe_summary",
]
