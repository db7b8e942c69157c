"""The label readout as a block of the run (issue 26): its settings, its wire fields, and the
server's side of column R (zorba_common.readout)."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from zorba_common.codec import decode, encode
from zorba_common.limits import MAX_REPORT_BYTES
from zorba_common.messages import HyperParams, Report
from zorba_common.readout import readout_block, table_columns
from zorba_server.config import AggregationConfig, ConfigError, RunConfig
from zorba_server.errors import Refusal
from zorba_server.rounds import ClientPlan, ReceivedReport, RoundPlan, check_report, decide_round

MEAN = AggregationConfig()
ON = HyperParams(0.1, 1e-3, 8, 64, "one-sided", 4, 0.03, readout_directions=16, readout_lr=0.05)
PLAN = RoundPlan(
    round=4, base_version=2, opened_at=0.0, deadline=10.0, hyper=ON,
    pool_indices=(7, 3, 9, 1), clients={"a": ClientPlan((0, 2), 4), "b": ClientPlan((1,), 2)},
)


def report(steps, readout=(), base=2) -> Report:
    return Report("k", base, tuple(steps), 8, 1.0, 1.0, 0, 0.1, readout_steps=tuple(readout))


def test_the_readout_is_the_column_after_the_body() -> None:
    assert readout_block(30) == 30
    assert table_columns(30, 0) == 30 and table_columns(30, 16) == 31


def test_the_readout_settings_are_checked() -> None:
    assert RunConfig().readout_directions == 0  # off: nothing changes for existing runs
    RunConfig(readout_directions=64, readout_lr=1e-3)
    for bad in ({"readout_directions": -1}, {"readout_directions": 65}, {"readout_lr": 0.0},
                {"readout_lr": float("nan")}):
        with pytest.raises(ConfigError, match="readout"):
            RunConfig(**bad)


def test_the_wire_leaves_the_readout_out_while_it_is_off() -> None:
    off = HyperParams(0.1, 1e-3, 8, 64)
    assert set(msgpack.unpackb(encode(off))) == {"lr", "mu", "batch_size", "seq_len", "estimator",
                                                 "directions", "trust_radius"}
    assert "readout_steps" not in msgpack.unpackb(encode(report([(7, 0.1)])))
    for message in (ON, report([(7, 0.1)], [(3, -0.5), (7, 2.0)])):
        assert decode(type(message), encode(message), max_bytes=MAX_REPORT_BYTES) == message
    assert msgpack.unpackb(encode(ON))["readout_directions"] == 16


def test_a_realistic_readout_report_stays_under_2_kb() -> None:
    """8 batches x 4 directions over the body, 16 readout directions a batch summed per pool
    index: the report with both."""
    steps = [(900 + t, 1234.5678 + t) for t in range(32)]
    readout = [(900 + t, -98.765432 + t) for t in range(32)]
    size = len(encode(report(steps, readout)))
    assert size < 2048, size


def test_readout_scalars_are_checked_against_the_round() -> None:
    check_report(PLAN, "a", report([(7, 0.1)], [(9, 1.0), (7, -2.0)]), max_abs_scalar=10)
    cases = [
        ("b", report([(7, 0.1)], [(9, 1.0)]), "wrong_steps"),  # b's pool indices are 7 and 3
        ("a", report([(7, 0.1)], [(7, 1.0), (7, 1.0)]), "wrong_steps"),
        ("a", report([(7, 0.1)], [(7, 11.0)]), "invalid_scalar"),
        ("a", report([(7, 0.1)], [(7, float("nan"))]), "invalid_scalar"),
    ]
    for client, rep, code in cases:
        with pytest.raises(Refusal) as err:
            check_report(PLAN, client, rep, max_abs_scalar=10)
        assert err.value.code == code
    off = dataclasses.replace(PLAN, hyper=HyperParams(0.1, 1e-3, 8, 64))
    with pytest.raises(Refusal, match="no label readout"):
        check_report(off, "a", report([(7, 0.1)], [(7, 1.0)]), max_abs_scalar=10)


def test_readout_scalars_become_column_r_at_the_readout_step() -> None:
    received = {"a": ReceivedReport("a", report([(7, 1.0)], [(7, 2.0), (9, -1.0)]), b"", 1.0),
                "b": ReceivedReport("b", report([(7, 3.0)], [(7, 4.0)]), b"", 1.0)}
    weights = {"a": 1.0, "b": 3.0}
    outcome = decide_round(PLAN, received, weights, min_reports=1, aggregation=MEAN,
                           readout_block=5)
    delta = outcome.delta
    assert delta is not None and delta.blocks == (0, 1, 2, 5)
    alpha = np.zeros((10, 6))
    alpha[np.ix_(delta.pool_indices, delta.blocks)] = delta.values
    # The weighted mean of the holders' scalars (every client holds R) at readout_lr ...
    assert alpha[7, 5] == pytest.approx(0.05 * (1 * 2.0 + 3 * 4.0) / 4, rel=1e-6)
    assert alpha[9, 5] == pytest.approx(0.05 * (1 * -1.0) / 4, rel=1e-6)
    # ... and the body's columns as without the readout.
    without = decide_round(PLAN, received, weights, min_reports=1, aggregation=MEAN)
    assert without.delta is not None and without.delta.blocks == (0, 1, 2)
    assert delta.pool_indices == (7, 9) and without.delta.pool_indices == (7,)
    np.testing.assert_array_equal(delta.values[:1, :3], without.delta.values)
    assert not delta.values[1, :3].any()  # k = 9 is a readout direction only


def test_plans_keep_the_readout_setting() -> None:
    assert RoundPlan.from_record(PLAN.to_record()) == PLAN
    older = PLAN.to_record() | {"hyper": [0.1, 1e-3, 8, 64, "one-sided", 4, 0.03]}
    assert RoundPlan.from_record(older).hyper.readout_directions == 0
