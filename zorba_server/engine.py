"""The round engine: the server's round policy as plain synchronous code.

No HTTP, no asyncio, no storage and no clock of its own: every call that depends on time
takes `now`, and every change it decides is returned to the caller before it is applied, so
a shell can make it durable first (the aiohttp coordinator commits to its database; the
simulator applies it at once; a Flower server app checkpoints it). Every shell drives the
same decisions:

    check_registration -> add_member          who may join (one admission rule, shared
                                              with the client's own check)
    propose_round -> open_round               plan: schedule, local steps, pool indices
                                              (what a polling client hears: polling.py)
    check_report -> accept_report             a report fits the plan, or a domain error
    due -> decide_close -> apply_close        alpha increments and memory calibrations
    mark_left / mark_seen, drop_member        a member that left, came back, or is gone

Errors are domain errors (`zorba_server.errors`); only the HTTP app maps them to statuses.
"""

from __future__ import annotations

from collections.abc import Iterable

from zorba_common.messages import Report
from zorba_server import errors
from zorba_server.engine_state import OpenRound, RoundRecord
from zorba_server.loss_guard import Plateau
from zorba_server.modes import SolveFn
from zorba_server.planning import RoundPlanning
from zorba_server.round_close import GuardResult, RoundClosing, RoundClosure, join_messages
from zorba_server.rounds import ReceivedReport, RoundPlan, check_report

__all__ = ["GuardResult", "OpenRound", "RoundClosure", "RoundEngine", "RoundRecord", "SolveFn",
           "join_messages", "round_closed"]


class RoundEngine(RoundPlanning, RoundClosing):
    """The state of one run and the rules that move it from round to round: the facade every
    shell drives (its parts: engine_state.py, members.py, planning.py, round_close.py)."""

    # ------------------------------------------------------------------ reports

    def check_report(self, client_id: str, round_: int, report: Report, now: float) -> OpenRound:
        """The open round `report` belongs to, or a domain error (nothing changes)."""
        r = self.open
        if r is None or r.plan.round != round_:
            raise self.refuse_round(round_)
        if client_id in r.received:
            raise errors.conflict("already_reported",
                                  f"client {client_id} already reported for round {round_}")
        if now >= self.closes_at(r.plan):
            raise round_closed(round_)
        check_report(r.plan, client_id, report, max_abs_scalar=self.config.aggregation.max_abs_scalar,
                     weights_only=self.weights_only)
        return r

    def refuse_round(self, round_: int) -> errors.Refusal:
        """Why a report for `round_`, which is not the open round, is refused: the round does
        not exist, or it closed."""
        r = self.open
        current = r.plan.round if r is not None else self.round_counter - 1
        if round_ > current or round_ < 1:
            return errors.not_found(
                "unknown_round", f"round {round_} does not exist (current round: {current})")
        return round_closed(round_)

    def accept_report(self, received: ReceivedReport) -> None:
        """Book a checked report into the open round and the member's record."""
        assert self.open is not None
        self.open.received[received.client_id] = received
        self.reports_accepted += 1
        member = self.members.get(received.client_id)
        if member is None:
            return
        member.rounds_reported += 1
        member.last_loss = received.report.loss_mean
        member.last_peak_bytes = received.report.peak_memory_bytes
        if received.report.step_time_s > 0:
            member.step_time_s = received.report.step_time_s

    # ------------------------------------------------------------------ resuming

    def restore_round(self, plan: RoundPlan, status: str, reports: int, closed_at: float | None,
                      loss: float | None, message: str) -> None:
        """Replay one stored round (in order) when a shell resumes a run."""
        self.round_counter = plan.round + 1
        self._previous = {cid: frozenset(p.blocks) for cid, p in plan.clients.items()}
        self.last_plan = plan
        self._plateau = Plateau(0, plan.step_decays)
        self.history.append(RoundRecord(plan.round, status, len(plan.clients), reports,
                                        plan.opened_at, closed_at, loss, message,
                                        plan.schedule_method, plan.final_check))

    def reopen(self, plan: RoundPlan, received: Iterable[ReceivedReport]) -> None:
        """Resume a round that was open when the shell stopped, with its accepted reports."""
        if self.history and self.history[-1].round == plan.round:
            self.history.pop()
        self.open = OpenRound(plan, {r.client_id: r for r in received})
        self.round_counter = plan.round + 1


def round_closed(round_: int) -> errors.Refusal:
    return errors.conflict(
        "round_closed",
        f"round {round_} closed: its reports were aggregated without this one; poll "
        "GET /v1/rounds/next for the next round",
    )
