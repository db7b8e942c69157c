"""The one line a closed round leaves in a log, written alike by every shell that drives the
round engine (the aiohttp coordinator and the Flower server app): what a person watching a
run reads, round by round."""

from __future__ import annotations

import logging

from zorba_server.engine import RoundClosure, RoundEngine


def closed_round_line(closure: RoundClosure, engine: RoundEngine) -> tuple[int, str]:
    """(level, text) for a round the engine has just applied (`engine.apply_close`): its
    status, reports of clients planned, mean training loss, the alpha version after it and the
    next round's step. Back-offs at WARNING: an operator running at that level still learns
    that the step was cut or a round rolled back."""
    outcome = closure.outcome
    loss = "-" if outcome.loss is None else f"{outcome.loss:.4g}"
    text = (f"round {closure.plan.round} {outcome.status}: {outcome.reports} of "
            f"{len(closure.plan.clients)} reports, loss {loss}, version {engine.version}, "
            f"next step {engine.hyper().lr:.3g}: {outcome.message}")
    return (logging.WARNING if closure.backs_off else logging.INFO), text
