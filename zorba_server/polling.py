"""What a polling client hears: TRAIN, WAIT or FINISHED (pure).

`GET /v1/rounds/next` answers from the engine's state: TRAIN with the client's assignment in
the open round, FINISHED, or WAIT with the deltas it lacks and why it waits. A shell that
makes every change durable before anyone hears of it (the aiohttp coordinator) also has
things in flight that the engine does not know yet: this client's report being committed, a
close being committed, the driver between a close and the next open. `poll_answer` takes
those as plain flags, so the long-poll's rules are tested without a server, a database or an
event loop; the shell only waits for a change or the timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zorba_common.messages import FINISHED, TRAIN, WAIT, NextRound
from zorba_server import errors

if TYPE_CHECKING:
    from zorba_server.engine import RoundEngine


def next_for(engine: RoundEngine, client_id: str, version: int, now: float) -> NextRound | None:
    """TRAIN or FINISHED for this client now, or None: it should wait."""
    if version > engine.version:
        raise errors.conflict(
            "version_ahead",
            f"client is at alpha version {version}, the server at {engine.version}: the run was "
            "reset or restored; fetch GET /v1/state and resync",
        )
    if engine.finished:
        deltas, catch_up = engine.deltas_since(version)
        return NextRound(FINISHED, engine.version, None, deltas, catch_up,
                         reason=engine.idle_reason)
    r = engine.open
    if (r is None or client_id not in r.plan.clients or client_id in r.received
            or now >= r.plan.deadline):
        return None
    deltas, catch_up = engine.deltas_since(version)
    return NextRound(TRAIN, engine.version, r.plan.assignment_for(client_id, now), deltas, catch_up)


def waiting(engine: RoundEngine, client_id: str, version: int, *,
            reported: bool = False) -> NextRound:
    """WAIT for a client at `version`: the deltas it lacks and why it waits. `reported`: its
    report for the open round is in, though not booked yet (a shell committing it)."""
    deltas, catch_up = engine.deltas_since(version)
    return NextRound(WAIT, engine.version, None, deltas, catch_up, retry_after_s=0.0,
                     reason=wait_reason(engine, client_id, reported=reported))


def wait_reason(engine: RoundEngine, client_id: str, *, reported: bool = False) -> str:
    r = engine.open
    if r is not None:
        if reported or client_id in r.received:
            return f"your report for round {r.plan.round} is in; waiting for the round to close"
        if client_id in r.plan.excluded:
            return f"the scheduler left you out of round {r.plan.round}: {r.plan.excluded[client_id]}"
        return f"round {r.plan.round} is running without you; you join the next round"
    return engine.idle_reason


def poll_answer(engine: RoundEngine, client_id: str, version: int, now: float, *,
                timed_out: bool, committing: bool = False, closing: bool = False,
                advancing: bool = False) -> NextRound | None:
    """The answer a long-poll gives now, or None: wait for a change (or the timeout).

    `committing`: this client's report for the open round is being committed; `closing`: a
    close of the open round is being committed; `advancing`: the driver is between closing a
    round and opening the next. A shell that applies every change at once has none of them.
    """
    answer = next_for(engine, client_id, version, now)
    # No TRAIN while the round's close is committing (it is over) or while this client's own
    # report is (it has trained this round already).
    if answer is not None and (answer.status != TRAIN or not (closing or committing)):
        return answer
    # A client behind the published version hears of it at once (with the deltas), not at the
    # end of its long-poll: it syncs, then polls again at the new version. (Not while the
    # driver is between a close and the next open: the new round's TRAIN, which carries the
    # deltas too, is a moment away.)
    if timed_out or (version < engine.version and not advancing):
        return waiting(engine, client_id, version, reported=committing)
    return None
