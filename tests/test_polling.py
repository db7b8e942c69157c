"""What a polling client hears, on a hand-made engine: the long-poll's rules, including those
for commits a durable shell has in flight, with no server, database or event loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_fakes import engine, join, received

from zorba_common.messages import FINISHED, TRAIN, WAIT
from zorba_server.engine import RoundEngine
from zorba_server.errors import Conflict
from zorba_server.polling import next_for, poll_answer, waiting
from zorba_server.rounds import RoundPlan


def open_round(e: RoundEngine, now: float = 0.0) -> RoundPlan:
    plan = e.propose_round(now=now)
    assert plan is not None
    e.open_round(plan)
    return plan


def apply_one_round(e: RoundEngine) -> None:
    """Both members report and the round is applied: the engine moves to the next version."""
    open_round(e)
    for cid in ("a", "b"):
        e.accept_report(received(e, cid, [1.0]))
    e.apply_close(e.decide_close(now=2.0))


def test_a_waiting_client_gets_the_deltas_it_lacks_and_why_it_waits(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a"), join(e, "b")
    apply_one_round(e)
    idle = waiting(e, "a", 0)
    assert (idle.status, idle.version, len(idle.deltas), idle.catch_up) == ("wait", 1, 1, False)
    assert idle.assignment is None and idle.reason == e.idle_reason
    nxt = open_round(e, now=3.0)
    assert "running without you" in waiting(e, "a", 1).reason  # (not booked yet)
    # A report that a shell is still committing: the client hears it is in.
    assert waiting(e, "a", 1, reported=True).reason == (
        f"your report for round {nxt.round} is in; waiting for the round to close")
    assert waiting(e, "a", 1).deltas == ()


def test_an_assigned_client_trains_until_it_reported_or_the_deadline_passed(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a"), join(e, "b")
    plan = open_round(e)
    train = next_for(e, "a", 0, now=1.0)
    assert train is not None and train.status == TRAIN
    assert train.assignment is not None and train.assignment.round == plan.round
    assert next_for(e, "a", 0, now=plan.deadline) is None
    e.accept_report(received(e, "a"))
    assert next_for(e, "a", 0, now=1.0) is None and next_for(e, "b", 0, now=1.0) is not None


def test_no_train_while_the_close_or_the_clients_own_report_is_committing(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a"), join(e, "b")
    open_round(e)
    trains = poll_answer(e, "a", 0, 1.0, timed_out=False)
    assert trains is not None and trains.status == TRAIN
    # The round's close is being committed: the poll waits for the next round, then says WAIT.
    assert poll_answer(e, "a", 0, 1.0, timed_out=False, closing=True) is None
    late = poll_answer(e, "a", 0, 1.0, timed_out=True, closing=True)
    assert late is not None and late.status == WAIT
    # Its own report is being committed: it trained this round already, and hears it is in.
    assert poll_answer(e, "a", 0, 1.0, timed_out=False, committing=True) is None
    told = poll_answer(e, "a", 0, 1.0, timed_out=True, committing=True)
    assert told is not None and told.status == WAIT and "your report for round 1 is in" in told.reason


def test_a_client_behind_hears_of_the_new_version_at_once_unless_a_round_is_opening(
        tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a"), join(e, "b")
    apply_one_round(e)
    # No round open: the client at version 0 gets the delta now, not at its timeout ...
    behind = poll_answer(e, "a", 0, 3.0, timed_out=False)
    assert behind is not None and behind.status == WAIT and behind.version == 1
    assert len(behind.deltas) == 1
    # ... but not while the driver is between the close and the next open (TRAIN is near),
    assert poll_answer(e, "a", 0, 3.0, timed_out=False, advancing=True) is None
    # and a client at the current version has nothing to hear before its timeout.
    assert poll_answer(e, "a", 1, 3.0, timed_out=False) is None


def test_a_finished_run_says_so_even_while_a_close_is_committing(tmp_path: Path) -> None:
    e = engine(tmp_path, max_rounds=1)
    join(e, "a"), join(e, "b")
    apply_one_round(e)
    done = poll_answer(e, "a", 0, 3.0, timed_out=False, closing=True, committing=True)
    assert done is not None and done.status == FINISHED and len(done.deltas) == 1


def test_a_client_ahead_of_the_server_is_told_to_resync(tmp_path: Path) -> None:
    e = engine(tmp_path)
    with pytest.raises(Conflict, match="fetch GET /v1/state and resync"):
        poll_answer(e, "a", 1, 0.0, timed_out=True)
