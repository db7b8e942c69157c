"""The round engine on hand-made members: plan, accept, close and drop, with no HTTP,
asyncio or database (the same engine the server and the simulator drive)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from engine_fakes import engine, join, open_next, received
from server_fakes import FINGERPRINT, FOOTPRINT, config_dict, profile

from zorba_server.config import config_from_dict
from zorba_server.drift import block_drift
from zorba_server.engine import RoundClosure, RoundEngine
from zorba_server.errors import Conflict, NotFound, Unprocessable
from zorba_server.members import Member
from zorba_server.rounds import APPLIED, CHECKED, FAILED, REJECTED, RoundPlan


def test_a_round_is_planned_accepted_and_closed_into_alpha_increments(tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2, lr=0.5, lr_scaling="dimension")
    join(e, "a"), join(e, "b")
    plan = e.propose_round(now=0.0)
    assert plan is not None and set(plan.clients) == {"a", "b"} and e.open is None
    e.open_round(plan)
    for cid in ("a", "b"):
        rep = received(e, cid, [1.0])
        e.check_report(cid, plan.round, rep.report, now=1.0)
        e.accept_report(rep)
    assert e.due(now=1.0)
    closure = e.decide_close(now=2.0)
    assert closure.outcome.status == APPLIED and e.version == 0  # decided, not applied
    e.apply_close(closure)
    assert e.version == 1 and e.open is None
    k = plan.pool_indices[0]
    assert e.alpha is not None
    # Both clients report g = 1 for k on every block they hold; each perturbs all 4 equal
    # blocks, so its step is lr / 4: alpha[k, b] = lr * 1 / 4.
    held = {b for p in plan.clients.values() for b in p.blocks}
    assert held == {0, 1, 2, 3} and plan.clients["a"].lr_scale == 0.25
    assert plan.assignment_for("a", 0.0).hyper.lr == 0.125
    assert np.allclose(e.alpha[k, sorted(held)], 0.125)
    assert e.members["a"].rounds_reported == 1


def test_reports_that_do_not_fit_the_plan_are_domain_errors_and_change_nothing(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a")
    plan = open_next(e)
    good = received(e, "a")
    with pytest.raises(NotFound):
        e.check_report("a", plan.round + 5, good.report, now=1.0)
    with pytest.raises(Conflict, match="not_assigned|no assignment"):
        e.check_report("stranger", plan.round, good.report, now=1.0)
    with pytest.raises(Unprocessable):
        e.check_report("a", plan.round, received(e, "a", [float("nan")]).report, now=1.0)
    with pytest.raises(Conflict, match="closed"):
        e.check_report("a", plan.round, good.report, now=plan.deadline)
    assert not e.open.received and e.version == 0


def test_too_few_reports_by_the_deadline_fail_the_round(tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2, min_reports=2)
    join(e, "a"), join(e, "b")
    plan = open_next(e)
    e.accept_report(received(e, "a"))
    assert not e.due(now=1.0) and e.due(now=plan.deadline)
    closure = e.decide_close(now=plan.deadline)
    e.apply_close(closure)
    assert closure.outcome.status == FAILED and e.version == 0
    assert e.propose_round(now=plan.deadline).base_version == 0  # the work is re-run


def test_reports_still_committing_hold_the_close_until_they_land_or_the_deadline(
        tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2)
    join(e, "a"), join(e, "b")
    plan = open_next(e)
    e.accept_report(received(e, "a"))
    e.accept_report(received(e, "b"))
    assert e.due(now=1.0) and not e.due(now=1.0, committing=True)
    assert e.due(now=plan.deadline, committing=True)  # the close then waits for the commits


def test_the_time_left_counts_down_to_the_open_rounds_deadline(tmp_path: Path) -> None:
    e = engine(tmp_path, round_duration_s=30.0)
    join(e, "a"), join(e, "b")
    assert e.time_left(now=0.0) is None  # no round open: the driver looks again when idle
    plan = e.propose_round(now=5.0)
    assert plan is not None
    e.open_round(plan)
    assert e.time_left(now=15.0) == 20.0 and e.time_left(now=40.0) == 0.0


def test_a_report_on_its_way_at_the_deadline_counts_within_the_grace(tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2, round_duration_s=30.0, report_grace_s=5.0)
    join(e, "a"), join(e, "b")
    plan = open_next(e)
    e.accept_report(received(e, "a"))
    # b is still missing at the deadline: the round waits the grace for it
    assert not e.due(now=plan.deadline) and e.time_left(now=plan.deadline) == 5.0
    late = received(e, "b")
    e.check_report("b", plan.round, late.report, now=plan.deadline + 4.0)
    e.accept_report(late)
    assert e.due(now=plan.deadline + 4.0)
    assert e.decide_close(now=plan.deadline + 4.0).outcome.reports == 2


def test_a_report_after_the_grace_is_refused_and_the_round_closes_without_it(
        tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2, round_duration_s=30.0, report_grace_s=5.0)
    join(e, "a"), join(e, "b")
    plan = open_next(e)
    e.accept_report(received(e, "a"))
    assert e.due(now=plan.deadline + 5.0)
    with pytest.raises(Conflict, match="closed"):
        e.check_report("b", plan.round, received(e, "b").report, now=plan.deadline + 5.0)


def test_a_report_for_a_round_that_is_not_open_is_unknown_or_closed(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a"), join(e, "b")
    assert e.refuse_round(1).code == "unknown_round"  # nothing opened yet
    open_next(e)
    for cid in ("a", "b"):
        e.accept_report(received(e, cid))
    e.apply_close(e.decide_close(now=1.0))
    closed, ahead, zero = e.refuse_round(1), e.refuse_round(2), e.refuse_round(0)
    assert (closed.code, ahead.code, zero.code) == ("round_closed", "unknown_round", "unknown_round")
    assert "GET /v1/rounds/next" in closed.message and "current round: 1" in ahead.message


def test_a_dropped_member_is_not_planned_again(tmp_path: Path) -> None:
    e = engine(tmp_path)
    join(e, "a"), join(e, "b")
    e.drop_member("b")
    plan = e.propose_round(now=0.0)
    assert plan is not None and set(plan.clients) == {"a"}


def test_a_budget_that_cannot_hold_a_block_is_refused_at_registration(tmp_path: Path) -> None:
    e = engine(tmp_path)
    with pytest.raises(Unprocessable, match="cheapest block"):
        join(e, "tiny", budget=1000)


def test_the_uniform_baseline_draws_other_blocks_each_round(tmp_path: Path) -> None:
    e = engine(tmp_path, mode="zorba-uniform", min_clients=2, memory_headroom=0.0)
    model = e.memory_model(profile(), 1.0)
    two_blocks = model.fixed_bytes + 2 * max(model.block_bytes) + 1  # of 4
    join(e, "a", budget=two_blocks), join(e, "b", budget=two_blocks)
    draws = []
    now = 0.0
    for _ in range(8):
        plan = e.propose_round(now=now)
        assert plan is not None
        e.open_round(plan)
        draws.append(tuple(sorted((cid, p.blocks) for cid, p in plan.clients.items())))
        for cid in plan.clients:
            e.accept_report(received(e, cid))
        e.apply_close(e.decide_close(now=now + 1))
        now += 2
    assert all(len(p) == 2 for d in draws for _, p in d)
    assert len(set(draws)) > 1


def run_round(e: RoundEngine, now: float, loss: float, last: float | None = None) -> str:
    plan = e.propose_round(now=now)
    assert plan is not None
    e.open_round(plan)
    for cid in plan.clients:
        rep = received(e, cid, loss=loss)
        if last is not None:
            rep.report = dataclasses.replace(rep.report, loss_last=last)
        e.accept_report(rep)
    closure = e.decide_close(now=now + 1)
    e.apply_close(closure)
    return closure.outcome.status


def test_a_round_whose_loss_jumps_is_not_applied_and_the_step_is_halved(tmp_path: Path) -> None:
    e = engine(tmp_path, lr=0.01, loss_jump_tolerance=0.5)
    join(e, "a")
    assert run_round(e, 0.0, loss=0.70) == APPLIED
    assert run_round(e, 2.0, loss=0.80) == APPLIED  # +14%: within the tolerance
    assert run_round(e, 4.0, loss=1.40) == REJECTED  # +75%
    assert e.version == 2 and "jumped" in e.history[-1].message
    assert e.propose_round(now=6.0).hyper.lr == 0.005
    # The rejected round's loss is the new reference (the model did not move): the next round
    # at half the step is applied unless the loss rises again, so a run can recover.
    assert run_round(e, 6.0, loss=1.45) == APPLIED
    # Divergence inside a round (last step far above the round's mean) is caught too.
    assert run_round(e, 8.0, loss=1.40, last=5.0) == REJECTED
    assert e.lr_factor() == 0.25 and e.version == 3


def test_the_loss_guard_can_be_turned_off(tmp_path: Path) -> None:
    e = engine(tmp_path, loss_jump_tolerance=0.0)
    join(e, "a")
    assert run_round(e, 0.0, loss=0.7) == APPLIED
    assert run_round(e, 2.0, loss=7.0) == APPLIED


def test_a_client_excluded_by_its_calibration_is_readmitted_after_a_few_rounds(
        tmp_path: Path) -> None:
    """Lock-out: a peak far above the model once excluded a client for good, because only a
    round it trains can lower its calibration (seen in a 25-minute quickstart)."""
    e = engine(tmp_path, memory_headroom=0.0)
    join(e, "big")
    model = e.memory_model(profile(), 1.0)
    small = join(e, "small", budget=model.fixed_bytes + min(model.block_bytes) + 10)
    small.calibration = 8.0  # as a wild measured peak leaves it (the clamp)
    planned_small = []
    for r in range(10):
        plan = e.propose_round(now=2.0 * r)
        assert plan is not None
        e.open_round(plan)
        planned_small.append("small" in plan.clients)
        for cid in plan.clients:
            e.accept_report(received(e, cid))  # no peak measured: calibrations only decay
        e.apply_close(e.decide_close(now=2.0 * r + 1))
    # 8 -> 4.5 -> 2.75 -> 1.88 -> 1.44 -> 1.22 -> 1 (within a band of 1): back in round 8.
    assert planned_small == [False] * 7 + [True] * 3
    assert small.calibration == 1.0


def test_the_loss_guard_compares_the_same_clients_across_rounds(tmp_path: Path) -> None:
    """Under non-IID data a client joining with a higher loss is no jump."""
    e = engine(tmp_path, loss_jump_tolerance=0.5)
    join(e, "a")
    b = join(e, "b")
    b.last_seen = -1e9  # offline in round 1
    losses = {"a": 0.30, "b": 1.20}

    def close_with(now: float, scale: float) -> str:
        plan = e.propose_round(now=now)
        assert plan is not None
        e.open_round(plan)
        for cid in plan.clients:
            e.accept_report(received(e, cid, loss=losses[cid] * scale))
        closure = e.decide_close(now=now + 1)
        e.apply_close(closure)
        return closure.outcome.status

    assert close_with(0.0, 1.0) == APPLIED  # a alone: 0.30
    b.last_seen = 2.0
    assert close_with(2.0, 1.05) == APPLIED  # a 0.315 (+5%); b's 1.26 has no reference yet
    assert close_with(4.0, 1.8) == REJECTED  # both +71% on their own last applied losses


def run_checked_round(e: RoundEngine, now: float, checks: dict[str, float],
                      loss: float = 1.0) -> str:
    """A round whose clients report these check-batch losses (measured at the round's base)."""
    return checked_closure(e, now, checks, loss).outcome.status


def checked_closure(e: RoundEngine, now: float, checks: dict[str, float],
                    loss: float = 1.0) -> RoundClosure:
    plan = e.propose_round(now=now)
    assert plan is not None
    e.open_round(plan)
    for cid in plan.clients:
        rep = received(e, cid, loss=loss)
        rep.report = dataclasses.replace(rep.report, loss_check=checks[cid])
        e.accept_report(rep)
    closure = e.decide_close(now=now + 1)
    e.apply_close(closure)
    return closure


def test_a_slow_drift_of_the_check_loss_rolls_the_table_back_to_the_last_good_version(
        tmp_path: Path) -> None:
    """Gemma 3 on the defaults: every round's rise stayed under the tolerance, so judged round
    by round nothing was wrong while the model degraded. Judged against the last version whose
    check losses did not rise, the drift adds up, and the table goes back to that version."""
    e = engine(tmp_path, lr=0.01, loss_jump_tolerance=0.5)
    join(e, "a"), join(e, "b")
    assert run_checked_round(e, 0.0, {"a": 1.0, "b": 2.0}) == APPLIED  # version 0 is the anchor
    assert run_checked_round(e, 2.0, {"a": 0.9, "b": 1.8}) == APPLIED  # better: version 1 is
    first = e.deltas[0]  # version 1's table is round 1's delta alone
    assert first.version == 1
    assert run_checked_round(e, 4.0, {"a": 1.1, "b": 2.1}) == APPLIED  # +19%: within 50%
    assert run_checked_round(e, 6.0, {"a": 1.3, "b": 2.5}) == APPLIED  # +41%
    before = e.version
    rolled_back = checked_closure(e, 8.0, {"a": 1.5, "b": 2.9})  # +63% over version 1
    assert rolled_back.outcome.status == REJECTED and rolled_back.backs_off
    message = e.history[-1].message
    assert "rolled back to version 1" in message and "check loss rose" in message
    # The new step itself, as the round will hand it out, and what to do about repeats.
    assert f"halved to {e.config.run.lr / 2:.3g} for the next rounds" in message
    assert "normalised" in message and message.count("halved") == 1
    # The rollback is published as a delta of its own: version 5 holds version 1's table.
    assert e.version == before + 1 and e.deltas[-1].version == e.version
    assert e.alpha is not None
    version_1 = np.zeros_like(e.alpha)
    version_1[np.ix_(first.pool_indices, first.blocks)] += first.matrix()
    np.testing.assert_allclose(e.alpha, version_1, atol=1e-6)
    assert e.lr_factor() == 0.5
    # The model is version 1's again, so its checks are too: the run goes on from there.
    assert run_checked_round(e, 10.0, {"a": 0.9, "b": 1.8}) == APPLIED


def test_check_losses_judge_instead_of_noisy_training_losses(tmp_path: Path) -> None:
    """A training loss that doubles on a new batch is no reason to reject while the same
    examples' loss, measured on the model itself, fell."""
    e = engine(tmp_path, loss_jump_tolerance=0.5)
    join(e, "a")
    assert run_checked_round(e, 0.0, {"a": 1.0}, loss=0.5) == APPLIED
    assert run_checked_round(e, 2.0, {"a": 0.9}, loss=1.2) == APPLIED
    assert run_checked_round(e, 4.0, {"a": 1.6}, loss=0.5) == REJECTED


def test_a_rise_on_a_small_loss_is_measured_against_a_coin_flip_not_the_loss_itself(
        tmp_path: Path) -> None:
    """0.30 -> 0.45 nats on one eight-example check batch is +50% of a small loss, and it
    rolled back a sound round of a 20-minute quickstart; a slide past a coin flip's loss
    (0.69) and beyond by half of it is what the guard is for."""
    e = engine(tmp_path, loss_jump_tolerance=0.5)
    join(e, "a")
    assert run_checked_round(e, 0.0, {"a": 0.30}) == APPLIED
    assert run_checked_round(e, 2.0, {"a": 0.45}) == APPLIED  # +0.15 < 0.5 x ln 2
    assert run_checked_round(e, 4.0, {"a": 0.62}) == APPLIED  # +0.32 < 0.35
    assert run_checked_round(e, 6.0, {"a": 0.70}) == REJECTED  # +0.40 over version 0's


def test_check_losses_that_stop_improving_halve_the_step_without_rolling_back(
        tmp_path: Path) -> None:
    """A step right for the start of a run overshoots once the gradient is small: the held-out
    loss of a 20-minute quickstart turned up after version 33. Rounds that do not bring the
    check losses back to the best version's cut the step; any that does restarts the count."""
    e = engine(tmp_path, lr=0.01, loss_jump_tolerance=0.5, plateau_rounds=3)
    join(e, "a")
    assert run_checked_round(e, 0.0, {"a": 1.00}) == APPLIED  # version 0: the anchor
    assert run_checked_round(e, 2.0, {"a": 0.80}) == APPLIED  # better: version 1 anchors
    assert run_checked_round(e, 4.0, {"a": 0.85}) == APPLIED  # 1 round without progress
    assert run_checked_round(e, 6.0, {"a": 0.79}) == APPLIED  # progress: the count restarts
    for r in range(2):
        stale = checked_closure(e, 8.0 + 2 * r, {"a": 0.82})
        assert stale.outcome.status == APPLIED and not stale.backs_off
    assert e.lr_factor() == 1.0 and "step is cut" not in e.history[-1].message
    version = e.version
    cut = checked_closure(e, 12.0, {"a": 0.81})  # the third: cut
    assert cut.outcome.status == APPLIED and cut.step_cut and cut.backs_off  # logged at WARNING
    assert e.version == version + 1  # applied: nothing is rolled back
    assert e.lr_factor() == 0.5
    assert "have not improved on version 3's for 3 rounds" in e.history[-1].message
    plan = e.propose_round(now=14.0)
    assert plan is not None and plan.hyper.lr == 0.005 and plan.step_decays == 1
    # A restarted server continues at the cut step: the next plan carries it.
    resumed = engine(tmp_path, lr=0.01, loss_jump_tolerance=0.5, plateau_rounds=3)
    resumed.restore_round(RoundPlan.from_record(plan.to_record()), APPLIED, 1, 15.0, 1.0, "")
    assert resumed.lr_factor() == 0.5


def test_the_plateau_cut_is_off_at_zero_and_works_without_the_loss_guard(tmp_path: Path) -> None:
    never = engine(tmp_path, loss_jump_tolerance=0.5, plateau_rounds=0)
    join(never, "a")
    for r in range(6):
        assert run_checked_round(never, 2.0 * r, {"a": 1.0 + 0.01 * r}) == APPLIED
    assert never.lr_factor() == 1.0
    unguarded = engine(tmp_path, loss_jump_tolerance=0.0, plateau_rounds=2)
    join(unguarded, "a")
    checks = [1.0, 0.9, 5.0, 5.0]  # a rise the guard would reject is applied, and counts
    assert [run_checked_round(unguarded, 2.0 * r, {"a": c}) for r, c in enumerate(checks)] == \
        [APPLIED] * 4
    assert unguarded.lr_factor() == 0.5


def test_a_round_closes_without_waiting_for_a_client_that_left(tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2)
    join(e, "a")
    b = join(e, "b")
    plan = e.propose_round(now=0.0)
    assert plan is not None and set(plan.clients) == {"a", "b"}
    e.open_round(plan)
    e.accept_report(received(e, "a"))
    assert not e.due(now=1.0)
    b.last_seen = -float("inf")  # POST /v1/leave
    assert e.due(now=1.0)


def test_a_member_that_left_is_not_waited_for_and_is_active_again_at_its_next_request(
        tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2)
    join(e, "a")
    b = join(e, "b")
    open_next(e)
    e.accept_report(received(e, "a"))
    e.mark_left(b)
    assert b.left and e.due(now=1.0) and b not in e.active_members(now=1.0)
    assert e.mark_seen(b, now=2.0)  # back: a shell records the return
    assert not b.left and b in e.active_members(now=2.0) and not e.due(now=2.0)
    assert not e.mark_seen(b, now=3.0)  # an ordinary request


def test_the_round_waits_for_every_assigned_client_whatever_the_order_of_reports_and_returns(
        tmp_path: Path) -> None:
    # `due` looks first where it found a client waited for last time (O(n) per round, not
    # O(n^2)): a client behind that point, back after leaving, must still be waited for.
    e = engine(tmp_path, min_clients=5)
    members = {cid: join(e, cid) for cid in "abcde"}
    open_next(e)
    assert e.open is not None
    order = list(e.open.plan.clients)
    first, last = order[0], order[-1]
    e.mark_left(members[first])
    for cid in order[1:-1]:
        assert not e.due(now=1.0)
        e.accept_report(received(e, cid))
    assert not e.due(now=1.0)  # the last one is waited for
    e.mark_seen(members[first], now=1.5)  # back, behind where `due` looks first
    e.accept_report(received(e, last))
    assert not e.due(now=2.0)
    e.accept_report(received(e, first))
    assert e.due(now=2.0)


def test_only_the_first_registration_pins_the_model_and_its_zero_table(tmp_path: Path) -> None:
    e = RoundEngine(config_from_dict(config_dict(tmp_path / "unused.sqlite3")))
    with pytest.raises(Conflict, match="no client has registered"):
        e.alpha_state("run")
    first = e.pin_first(profile())
    assert first is not None and first.shape == (e.pool_size, FOOTPRINT.num_blocks)
    assert not first.any() and e.alpha is first and e.fingerprint == FINGERPRINT
    assert e.pin_first(profile()) is None and e.alpha is first
    state = e.alpha_state("run")
    assert (state.run_id, state.version, state.pool_size, state.num_blocks) == (
        "run", 0, e.pool_size, FOOTPRINT.num_blocks)
    assert state.alpha == first.astype("<f8").tobytes()


def test_a_new_member_starts_with_its_declared_step_time_and_no_calibration(tmp_path: Path) -> None:
    p = dataclasses.replace(profile(), step_time_s=0.25)
    m = Member.joining("c-1", p, now=7.0)
    assert (m.client_id, m.registered_at, m.last_seen, m.calibration, m.step_time_s) == (
        "c-1", 7.0, 7.0, 1.0, 0.25)
    assert not m.left and m.rounds_reported == 0


def test_the_run_counters_count_booked_reports_and_closed_rounds_by_outcome(tmp_path: Path) -> None:
    e = engine(tmp_path, min_clients=2, min_reports=2)
    join(e, "a"), join(e, "b")
    for reporters, status in ((["a"], FAILED), (["a", "b"], APPLIED)):
        open_next(e)
        for cid in reporters:
            e.accept_report(received(e, cid))
        closure = e.decide_close(now=1.0)
        assert closure.outcome.status == status
        e.apply_close(closure)
    counters = e.counters()
    assert counters == {"reports_accepted": 3, "rounds_applied": 1, "rounds_rejected": 0,
                        "rounds_failed": 1, "rounds_checked": 0,
                        "schedules_solved": e.schedules_solved}
    assert e.schedules_solved >= 1


def test_disjoint_pool_slices_give_each_holder_of_a_block_its_own_directions(
        tmp_path: Path) -> None:
    """Shared (the default): the holders of a block measure the same pool indices, so a
    round moves each block along as many directions as its longest client's steps. Disjoint:
    every client its own slice, so a block moves along all its holders' directions."""
    def round_with(pool_slices: str) -> tuple[RoundPlan, RoundClosure]:
        e = engine(tmp_path, pool_slices=pool_slices, max_steps=3, loss_jump_tolerance=0.0)
        join(e, "a"), join(e, "b")
        plan = open_next(e)
        for cid in plan.clients:
            e.accept_report(received(e, cid, [1.0] * plan.clients[cid].num_steps))
        return plan, e.decide_close(now=1.0)

    shared, shared_close = round_with("shared")
    assert [shared.assignment_for(c, 0.0).pool_indices for c in ("a", "b")] == \
        [shared.pool_indices[:3]] * 2
    disjoint, disjoint_close = round_with("disjoint")
    a, b = (disjoint.assignment_for(c, 0.0).pool_indices for c in ("a", "b"))
    assert len(disjoint.pool_indices) == 6 and a + b == disjoint.pool_indices
    assert (disjoint.clients["a"].first_step, disjoint.clients["b"].first_step) == (0, 3)
    # Both clients hold every block here: the shared round publishes 3 rows, the disjoint
    # one a row for every distinct index of the 6 (the same index drawn twice adds up).
    assert shared_close.delta is not None and disjoint_close.delta is not None
    assert len(shared_close.delta.pool_indices) == len(set(shared.pool_indices))
    assert len(disjoint_close.delta.pool_indices) == len(set(disjoint.pool_indices))
    # A client reporting another client's slice is refused; the plan survives its record.
    e = engine(tmp_path, pool_slices="disjoint", max_steps=3)
    join(e, "a"), join(e, "b")
    plan = open_next(e)
    wrong = received(e, "a")
    wrong.report = dataclasses.replace(wrong.report, steps=tuple(
        (k, 0.1) for k in plan.pool_indices[3:6]))
    assert plan.pool_indices[3] != plan.pool_indices[0]  # the run's seed draws them so
    with pytest.raises(Unprocessable, match="step 0 reports pool index"):
        e.check_report("a", plan.round, wrong.report, now=0.5)
    e.check_report("b", plan.round, wrong.report, now=0.5)  # b's own slice is fine
    assert RoundPlan.from_record(plan.to_record()) == plan
    older = plan.to_record()
    older["clients"] = {cid: p[:3] for cid, p in older["clients"].items()}  # before slices
    assert all(p.first_step == 0 for p in RoundPlan.from_record(older).clients.values())


def test_check_losses_drifting_up_within_the_jump_tolerance_roll_back_after_some_rounds(
        tmp_path: Path) -> None:
    """Gemma 3 at the defaults: 0.763 -> 0.883 over six rounds, each within the 50% tolerance
    and the total too. Three rounds in a row above the anchor, the last more than 10% above
    it, are a trend: the table goes back to the anchor (loss_drift.py)."""
    e = engine(tmp_path, lr=0.01, loss_jump_tolerance=0.5, plateau_rounds=0)
    join(e, "a")
    assert run_checked_round(e, 0.0, {"a": 0.76}) == APPLIED  # version 0: the anchor
    assert run_checked_round(e, 2.0, {"a": 0.80}) == APPLIED  # 1 round above it
    assert run_checked_round(e, 4.0, {"a": 0.83}) == APPLIED  # 2
    drifted = checked_closure(e, 6.0, {"a": 0.86})  # 3 rounds, +13%: rolled back
    assert drifted.outcome.status == REJECTED and drifted.backs_off
    assert "drifted up over 3 rounds" in drifted.outcome.message
    assert "rolled back to version 0" in drifted.outcome.message
    # Back to version 0's table (zeros) up to the float32 the rollback delta travels in.
    assert e.alpha is not None and np.abs(e.alpha).max() < 1e-6 and e.lr_factor() == 0.5


def test_the_drift_rule_waits_for_its_rounds_and_its_tolerance_and_is_off_at_zero(
        tmp_path: Path) -> None:
    slow = engine(tmp_path, loss_jump_tolerance=0.5, plateau_rounds=0)
    join(slow, "a")
    # Above the anchor for five rounds, but never by 10%: a plateau, not a drift.
    assert [run_checked_round(slow, 2.0 * r, {"a": 1.0 + 0.015 * r}) for r in range(6)] == [APPLIED] * 6
    off = engine(tmp_path, loss_jump_tolerance=0.5, plateau_rounds=0, loss_drift_rounds=0)
    join(off, "a")
    assert [run_checked_round(off, 2.0 * r, {"a": 1.0 + 0.05 * r}) for r in range(6)] == [APPLIED] * 6


def test_the_drift_bound_scales_a_round_that_would_carry_a_block_past_it(tmp_path: Path) -> None:
    e = engine(tmp_path, lr=1.0, max_drift=0.05)
    join(e, "a")
    assert e.alpha is not None
    e.base_rms = (1.0,) * e.alpha.shape[1]
    closure = checked_closure(e, 0.0, {"a": 1.0})
    assert closure.outcome.status == APPLIED and "run.max_drift = 0.05" in closure.outcome.message
    assert block_drift(e.alpha, e.base_rms).max() == pytest.approx(0.05, rel=1e-5)
    unbounded = engine(tmp_path, lr=1.0, max_drift=0.05)  # no base RMS given: the bound is off
    join(unbounded, "a")
    assert "max_drift" not in checked_closure(unbounded, 0.0, {"a": 1.0}).outcome.message


def test_max_rounds_counts_applied_rounds_not_versions(tmp_path: Path) -> None:
    """A rollback publishes a version of its own; a run of max_rounds = 5 once stopped after 4
    applied rounds and a rollback, saying it had applied 5 (issue 26, the Gemma 3 trial)."""
    e = engine(tmp_path, lr=0.01, loss_jump_tolerance=0.5, max_rounds=5)
    join(e, "a"), join(e, "b")
    for now, checks in ((0.0, {"a": 1.0, "b": 2.0}), (2.0, {"a": 0.9, "b": 1.8}),
                        (4.0, {"a": 1.1, "b": 2.1}), (6.0, {"a": 1.3, "b": 2.5})):
        assert run_checked_round(e, now, checks) == APPLIED
    assert checked_closure(e, 8.0, {"a": 1.5, "b": 2.9}).outcome.status == REJECTED
    assert e.version == 5 and e.rounds_applied == 4 and not e.finished
    assert run_checked_round(e, 10.0, {"a": 0.9, "b": 1.8}) == APPLIED
    assert e.rounds_applied == 5 and not e.finished  # its final version is checked first
    assert run_checked_round(e, 12.0, {"a": 0.9, "b": 1.8}) == CHECKED
    assert e.rounds_applied == 5 and e.finished
    assert e.idle_reason.startswith("the run finished after 5 applied rounds")
