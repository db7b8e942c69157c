"""Aggregation (docs/design.md §2), pool indices and the round rules, as pure functions."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from zorba_common.errors import InvalidScalarError
from zorba_common.messages import HyperParams, Report
from zorba_server.aggregation import Contribution, aggregate, apply_delta, check_scalars
from zorba_server.config import AggregationConfig
from zorba_server.errors import Refusal
from zorba_server.pool_indices import round_pool_indices
from zorba_server.rounds import (
    APPLIED,
    FAILED,
    ClientPlan,
    ReceivedReport,
    RoundPlan,
    check_report,
    decide_round,
)

MEAN = AggregationConfig()


def dense(delta, shape=(8, 4)) -> np.ndarray:
    return apply_delta(np.zeros(shape), delta)


def test_mean_is_the_sample_weighted_average_over_the_clients_holding_each_block() -> None:
    contributions = [
        Contribution("a", (0, 1), 1.0, ((3, 2.0), (5, 1.0))),
        Contribution("b", (1,), 3.0, ((3, -1.0), (3, 0.5))),  # k=3 twice: summed
    ]
    alpha = dense(aggregate(contributions, 0.1, MEAN))
    expected = np.zeros((8, 4))
    expected[3, 0] = 0.1 * 2.0                      # only a holds block 0
    expected[5, 0] = 0.1 * 1.0
    expected[3, 1] = 0.1 * (1 * 2.0 + 3 * (-0.5)) / 4
    expected[5, 1] = 0.1 * (1 * 1.0 + 3 * 0.0) / 4  # b did not take k=5: it contributes 0
    np.testing.assert_allclose(alpha, expected, rtol=1e-6)
    assert not alpha[:, 2:].any()


def test_sum_counts_every_holders_update_whole() -> None:
    """Two equal clients on one block, each its own direction: the mean halves both steps,
    the sum keeps each as its client took it; a block one client holds is the same either way."""
    contributions = [Contribution("a", (0, 1), 1.0, ((3, 2.0),)),
                     Contribution("b", (1,), 1.0, ((5, -1.0),))]
    total = dense(aggregate(contributions, 0.1, AggregationConfig(method="sum")))
    mean = dense(aggregate(contributions, 0.1, MEAN))
    np.testing.assert_allclose(total[[3, 5], 1], [0.1 * 2.0, 0.1 * -1.0], rtol=1e-6)
    np.testing.assert_allclose(mean[[3, 5], 1], [0.1 * 1.0, 0.1 * -0.5], rtol=1e-6)
    np.testing.assert_array_equal(total[:, 0], mean[:, 0])


def test_sum_keeps_the_weights_shares_between_holders() -> None:
    contributions = [Contribution("a", (0,), 1.0, ((3, 1.0),)),
                     Contribution("b", (0,), 3.0, ((5, 1.0),))]
    total = dense(aggregate(contributions, 1.0, AggregationConfig(method="sum")))
    # Mean weights 1/4 and 3/4, times the 2 holders.
    np.testing.assert_allclose(total[[3, 5], 0], [0.5, 1.5], rtol=1e-6)


def test_the_result_does_not_depend_on_report_order_to_the_last_bit() -> None:
    rng = random.Random(3)
    contributions = [
        Contribution(f"c{i}", tuple(sorted(rng.sample(range(4), 2))), rng.uniform(1, 100),
                     tuple((rng.randrange(8), rng.uniform(-5, 5)) for _ in range(6)))
        for i in range(30)
    ]
    first = aggregate(contributions, 1e-3, MEAN)
    rng.shuffle(contributions)
    again = aggregate(contributions, 1e-3, MEAN)
    assert first.pool_indices == again.pool_indices and first.blocks == again.blocks
    assert first.values.tobytes() == again.values.tobytes()


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_modes_ignore_one_wild_client(method: str) -> None:
    honest = [Contribution(f"h{i}", (0,), 1.0, ((1, 1.0 + 0.01 * i),)) for i in range(9)]
    wild = Contribution("w", (0,), 1000.0, ((1, 1e5),))
    config = AggregationConfig(method=method, trim_fraction=0.2)
    robust = dense(aggregate([*honest, wild], 1.0, config))[1, 0]
    assert 1.0 <= robust <= 1.1
    assert dense(aggregate([*honest, wild], 1.0, MEAN))[1, 0] > 1000


def test_clipping_bounds_each_scalar_before_aggregation() -> None:
    contributions = [Contribution("a", (0,), 1.0, ((0, 50.0), (0, -0.5)))]
    delta = aggregate(contributions, 1.0, AggregationConfig(clip=2.0))
    assert dense(delta)[0, 0] == pytest.approx(1.5)


def test_robust_modes_only_count_clients_that_took_the_step() -> None:
    contributions = [Contribution("a", (0,), 1.0, ((0, 4.0), (1, 2.0))),
                     Contribution("b", (0,), 1.0, ((0, 6.0),))]
    alpha = dense(aggregate(contributions, 1.0, AggregationConfig(method="median")))
    assert alpha[0, 0] == 5.0 and alpha[1, 0] == 2.0


@pytest.mark.parametrize("g", [float("nan"), float("inf"), -1e7])
def test_non_finite_or_out_of_range_scalars_are_refused(g: float) -> None:
    with pytest.raises(InvalidScalarError, match="step 1"):
        check_scalars([(0, 1.0), (1, g)], max_abs=1e6)


def test_pool_indices_are_a_pure_function_of_seed_and_round() -> None:
    first = round_pool_indices(42, 7, 100, 1024)
    assert first == round_pool_indices(42, 7, 100, 1024)
    assert first[:10] == round_pool_indices(42, 7, 10, 1024)  # prefixes agree
    assert first != round_pool_indices(42, 8, 100, 1024)
    assert first != round_pool_indices(43, 7, 100, 1024)
    assert all(0 <= k < 1024 for k in first)
    # Golden values: an upgraded server must hand out the indices of past rounds.
    assert round_pool_indices(0, 1, 5, 1024) == (376, 582, 676, 968, 486)
    assert round_pool_indices(2**40 + 5, 3, 4, 1 << 20) == (361532, 937816, 593758, 911998)


PLAN = RoundPlan(
    round=4, base_version=2, opened_at=0.0, deadline=10.0, hyper=HyperParams(0.1, 1e-3, 8, 64),
    pool_indices=(7, 3, 7, 1), clients={"a": ClientPlan((0, 2), 4), "b": ClientPlan((1,), 2)},
)


def report(steps, base=2) -> Report:
    return Report("k", base, tuple(steps), 8, 1.0, 1.0, 0, 0.1)


def test_a_report_must_follow_its_assignment() -> None:
    check_report(PLAN, "a", report([(7, 0.1), (3, 0.2)]), max_abs_scalar=10)  # a prefix is fine
    cases = [
        ("c", report([(7, 0.1)]), "not_assigned"),
        ("a", report([(7, 0.1)], base=1), "stale_version"),
        ("b", report([(7, 0.1), (3, 0.1), (7, 0.1)]), "wrong_steps"),
        ("a", report([(3, 0.1)]), "wrong_steps"),
        ("a", report([(7, 11.0)]), "invalid_scalar"),
    ]
    for client, rep, code in cases:
        with pytest.raises(Refusal) as err:
            check_report(PLAN, client, rep, max_abs_scalar=10)
        assert err.value.code == code


def test_a_round_with_too_few_reports_fails_and_applies_nothing() -> None:
    received = {"a": ReceivedReport("a", report([(7, 1.0)]), b"", 1.0)}
    weights = {"a": 1.0, "b": 1.0}
    failed = decide_round(PLAN, received, weights, min_reports=2, aggregation=MEAN)
    assert failed.status == FAILED and failed.delta is None and "re-run" in failed.message
    applied = decide_round(PLAN, received, weights, min_reports=1, aggregation=MEAN)
    assert applied.status == APPLIED and applied.delta.blocks == (0, 2)
    assert applied.loss == 1.0


def test_plans_survive_their_storage_record() -> None:
    assert RoundPlan.from_record(PLAN.to_record()) == PLAN
    # A resumed round re-issues assignments from its stored plan: every hyper-parameter the
    # clients were told must come back, the trust region included.
    bounded = dataclasses.replace(PLAN, hyper=HyperParams(0.1, 1e-3, 8, 64, "one-sided", 4, 0.03))
    assert RoundPlan.from_record(bounded.to_record()).hyper == bounded.hyper
    older = PLAN.to_record() | {"hyper": [0.1, 1e-3, 8, 64, "one-sided", 4]}
    assert RoundPlan.from_record(older).hyper.trust_radius == 0.0
