"""A round engine on hand-made members, shared by the tests of the pure round policy (not a
test module itself): no HTTP, asyncio or database."""

from __future__ import annotations

from pathlib import Path

from server_fakes import FINGERPRINT, FOOTPRINT, config_dict, make_report, profile

from zorba_server.config import config_from_dict
from zorba_server.engine import RoundEngine
from zorba_server.members import Member
from zorba_server.round_close import RoundClosure
from zorba_server.rounds import ReceivedReport, RoundPlan


def engine(tmp_path: Path, **run: object) -> RoundEngine:
    config = config_from_dict(config_dict(tmp_path / "unused.sqlite3", **run))
    made = RoundEngine(config)
    made.pin(FINGERPRINT, FOOTPRINT)
    return made


def join(e: RoundEngine, name: str, samples: int = 100, budget: int = 2**32,
         base_rms: tuple[float, ...] | None = None, fluency_curvature: float | None = None) -> Member:
    p = profile(samples, budget=budget, name=name, base_rms=base_rms,
                fluency_curvature=fluency_curvature)
    e.check_registration(p)
    member = Member(name, p, 0.0, 1.0, 0.0, p.step_time_s)
    e.add_member(member)
    return member


def received(e: RoundEngine, cid: str, grads: list[float] | None = None, **kw: object) -> ReceivedReport:
    assert e.open is not None
    assignment = e.open.plan.assignment_for(cid, 0.0)
    return ReceivedReport(cid, make_report(assignment, grads, **kw), b"", 1.0)


def open_next(e: RoundEngine, now: float = 0.0) -> RoundPlan:
    """Plan the next round at `now` and open it (a test's usual first step)."""
    plan = e.propose_round(now=now)
    assert plan is not None
    e.open_round(plan)
    return plan


def close_round(e: RoundEngine, now: float, *reporters: str) -> RoundClosure:
    """Open the next round at `now`, take a plain report from each of `reporters`, close it
    and apply what closing decided; the closure says what that was."""
    open_next(e, now=now)
    for cid in reporters:
        e.accept_report(received(e, cid))
    closure = e.decide_close(now=now)
    e.apply_close(closure)
    return closure
