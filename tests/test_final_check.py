"""The run ends on a judged version (issue 26, item 5): after run.max_rounds applied rounds a
final check measures the last version and rolls it back when the loss guard or the fluency
watch rejects it; clients that leave only delay it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from engine_fakes import engine, join, received
from test_safety_server import RMS

from zorba_server.engine import RoundClosure, RoundEngine
from zorba_server.final_check import STEPS
from zorba_server.polling import next_for
from zorba_server.rounds import APPLIED, CHECKED, FAILED, REJECTED


def close(e: RoundEngine, now: float, checks: dict[str, float],
          generic: dict[str, float] | None = None) -> RoundClosure:
    """One round: the clients in `checks` report these check (and generic-text) losses."""
    plan = e.propose_round(now=now)
    assert plan is not None, e.idle_reason
    e.open_round(plan)
    for cid, check in checks.items():
        rep = received(e, cid, loss_generic=(generic or {}).get(cid))
        rep.report = dataclasses.replace(rep.report, loss_check=check)
        e.accept_report(rep)
    closure = e.decide_close(now=now + 1)
    e.apply_close(closure)
    return closure


def two_clients(tmp_path: Path, **run: object) -> RoundEngine:
    e = engine(tmp_path, lr=0.01, max_rounds=2, **run)
    join(e, "a", base_rms=RMS), join(e, "b", base_rms=RMS)
    return e


def test_the_last_applied_version_is_checked_before_the_run_finishes_on_it(tmp_path: Path) -> None:
    e = two_clients(tmp_path)
    both = {"a": 1.0, "b": 1.0}
    for now in (0.0, 2.0):
        assert close(e, now, both, {"a": 3.0, "b": 3.0}).outcome.status == APPLIED
    assert e.rounds_applied == 2 and not e.finished
    alpha, version = e.alpha.copy(), e.version
    check = close(e, 4.0, {"a": 0.9, "b": 0.95}, {"a": 3.1, "b": 3.0})
    # One step each (any client reports at least one), measured, never applied.
    assert check.plan.final_check and all(p.num_steps == STEPS for p in check.plan.clients.values())
    assert check.outcome.status == CHECKED and check.delta is None
    assert e.version == version and np.array_equal(e.alpha, alpha)
    assert "final check of version 2" in check.outcome.message
    assert "the run ends on version 2" in check.outcome.message
    assert e.finished and "final version judged sound" in e.idle_reason
    assert e.propose_round(now=6.0) is None
    answer = next_for(e, "a", version, now=6.0)
    assert answer is not None and answer.status == "finished"
    assert e.counters()["rounds_checked"] == 1


def test_a_final_version_the_guard_rejects_is_rolled_back_and_the_run_ends_on_the_last_sound_one(
        tmp_path: Path) -> None:
    e = two_clients(tmp_path)
    close(e, 0.0, {"a": 1.0, "b": 1.0})
    sound = e.alpha.copy()  # version 1: the anchor once round 2's check losses hold
    close(e, 2.0, {"a": 1.0, "b": 1.0})
    check = close(e, 4.0, {"a": 2.0, "b": 2.2})
    assert check.plan.final_check and check.outcome.status == REJECTED
    assert check.outcome.message.startswith("final check of version 2: the clients' check loss rose")
    assert "the run ends on version 1's table" in check.outcome.message
    assert e.version == 3 and np.allclose(e.alpha, sound, rtol=0, atol=1e-8)
    assert e.finished and "rolled back by the final check" in e.idle_reason


def test_a_final_version_that_broke_generation_is_rolled_back_to_the_last_fluent_one(
        tmp_path: Path) -> None:
    e = two_clients(tmp_path, loss_jump_tolerance=0.0, loss_drift_rounds=0)  # the watch alone
    close(e, 0.0, {"a": 1.0, "b": 1.0}, {"a": 3.0, "b": 3.0})
    fluent = e.alpha.copy()
    close(e, 2.0, {"a": 1.0, "b": 1.0}, {"a": 3.2, "b": 3.1})
    check = close(e, 4.0, {"a": 1.0, "b": 1.0}, {"a": 4.5, "b": 4.0})
    assert check.outcome.status == REJECTED and "generation broke" in check.outcome.message
    assert "the run ends on version 1's table" in check.outcome.message
    assert np.allclose(e.alpha, fluent, rtol=0, atol=1e-8) and e.finished


def test_a_final_check_with_too_few_reports_is_run_again_until_clients_measure_it(
        tmp_path: Path) -> None:
    e = two_clients(tmp_path, min_clients=2, min_reports=2)
    for now in (0.0, 2.0):
        close(e, now, {"a": 1.0, "b": 1.0})
    # b left during the check: too few reports, nothing judged, the run goes on checking.
    failed = close(e, 4.0, {"a": 1.0})
    assert failed.outcome.status == FAILED and not e.finished
    assert "version 2 is not judged yet" in failed.outcome.message
    e.mark_left(e.members["b"])
    assert e.propose_round(now=6.0) is None
    assert "the final version (2) is not checked yet" in e.idle_reason
    e.mark_seen(e.members["b"], 6.0)
    again = close(e, 6.0, {"a": 1.0, "b": 1.0})
    assert again.plan.final_check and again.outcome.status == CHECKED and e.finished


def test_a_run_whose_clients_measure_nothing_the_checks_read_finishes_as_before(tmp_path: Path) -> None:
    e = engine(tmp_path, lr=0.01, max_rounds=2)
    join(e, "old")  # an older client: no check loss, no generic-text loss
    for now in (0.0, 2.0):
        plan = e.propose_round(now=now)
        assert plan is not None and not plan.final_check
        e.open_round(plan)
        e.accept_report(received(e, "old"))
        e.apply_close(e.decide_close(now=now + 1))
    assert e.finished and e.idle_reason == "the run finished after 2 applied rounds"
    # Every rule off: nothing can judge, the run finishes at max_rounds.
    e = two_clients(tmp_path, loss_jump_tolerance=0.0, loss_drift_rounds=0, fluency_tolerance=0.0)
    for now in (0.0, 2.0):
        close(e, now, {"a": 1.0, "b": 1.0})
    assert e.finished


def test_a_version_the_guard_rejected_is_never_the_watchs_fluent_version(tmp_path: Path) -> None:
    """A fluency rollback goes to the last version found fluent; one the loss guard had just
    rejected (its check losses jumped) is no such version, whatever its generic-text loss."""
    e = engine(tmp_path, lr=0.01)
    join(e, "a", base_rms=RMS), join(e, "b", base_rms=RMS)
    close(e, 0.0, {"a": 1.0, "b": 1.0}, {"a": 3.0, "b": 3.0})
    assert e.fluent is not None and e.fluent.version == 0
    rejected = close(e, 2.0, {"a": 2.0, "b": 2.0}, {"a": 3.0, "b": 3.0})
    assert rejected.outcome.status == REJECTED
    assert e.fluent.version == 0
