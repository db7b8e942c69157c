"""The label readout's own directions (issue 26): each client measures readout pool indices no
other client of the round measures, new ones every batch; the server hands them out, accepts
only a client's own, and publishes column R apart from the dense matrix, within the byte budget."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from test_readout_client import READOUT, readout_trainer
from test_readout_run import ON, report

from zorba_common.codec import decode, encode
from zorba_common.limits import MAX_REPORT_BYTES
from zorba_common.messages import AlphaDelta, Assignment, NextRound
from zorba_common.readout import MAX_READOUT_INDICES_PER_ROUND
from zorba_edge.client.trainer import ReadoutRound
from zorba_server.aggregation import RoundDelta, with_half_column
from zorba_server.config import AggregationConfig
from zorba_server.errors import Refusal
from zorba_server.pool_indices import round_pool_indices, round_readout_indices
from zorba_server.rounds import (
    ClientPlan,
    ReceivedReport,
    RoundPlan,
    check_report,
    decide_round,
    slice_readout,
)


def test_the_round_readout_list_is_distinct_seeded_and_its_own() -> None:
    ks = round_readout_indices(7, 3, 200, 1024)
    assert len(ks) == len(set(ks)) == 200
    assert ks == round_readout_indices(7, 3, 200, 1024)  # a pure function of (seed, round)
    assert ks != round_readout_indices(7, 4, 200, 1024)
    assert ks[:12] != round_pool_indices(7, 3, 12, 1024)  # not the body's list
    assert round_readout_indices(7, 3, 50, 1024) == ks[:50]  # a prefix: slices are stable
    assert sorted(round_readout_indices(1, 1, 99, 16)) == list(range(16))  # at most the pool
    assert round_readout_indices(1, 1, 0, 16) == ()


def test_each_client_gets_its_own_slice_of_whole_batches() -> None:
    clients = {"b": ClientPlan((1,), 12), "a": ClientPlan((0,), 5), "c": ClientPlan((2,), 0)}
    sliced = slice_readout(clients, directions=4, readout_directions=16, pool_size=1024)
    # a: 2 batches (4 + 1 steps) x 16; b: 3 x 16; c none; in client-id order.
    assert [(sliced[c].readout_first, sliced[c].readout_count) for c in "abc"] == [(0, 32), (32, 48), (80, 0)]
    assert sliced["b"].blocks == (1,) and sliced["b"].num_steps == 12  # the body's plan unchanged
    # The round's budget, shared equally in whole batches.
    many = {f"c{i:03d}": ClientPlan((0,), 12) for i in range(10)}
    shares = slice_readout(many, 4, 16, 1024)
    assert all(p.readout_count == 16 for p in shares.values())  # 256 // 10 = 25 -> one batch
    assert sum(p.readout_count for p in shares.values()) <= MAX_READOUT_INDICES_PER_ROUND
    crowd = {f"c{i:03d}": ClientPlan((0,), 12) for i in range(17)}
    assert all(p.readout_count == 0 for p in slice_readout(crowd, 4, 16, 1024).values())


def plan_with_own_indices() -> RoundPlan:
    clients = slice_readout({"a": ClientPlan((0, 2), 4), "b": ClientPlan((1,), 4)}, 4, 16, 64)
    return RoundPlan(round=4, base_version=2, opened_at=0.0, deadline=10.0, hyper=ON,
                     pool_indices=(7, 3, 9, 1), clients=clients,
                     readout_pool_indices=round_readout_indices(5, 4, 32, 64))


def test_assignments_carry_disjoint_readout_indices_and_plans_keep_them() -> None:
    plan = plan_with_own_indices()
    a, b = (plan.assignment_for(c, 0.0).readout_pool_indices for c in "ab")
    assert len(a) == len(b) == 16 and not set(a) & set(b)
    assert plan.assignment_for("a", 0.0).pool_indices == plan.assignment_for("b", 0.0).pool_indices
    assert RoundPlan.from_record(plan.to_record()) == plan
    old = plan.to_record()  # a plan stored before the readout had its own indices
    old.pop("readout_pool_indices")
    old["clients"] = {cid: p[:4] for cid, p in old["clients"].items()}
    assert RoundPlan.from_record(old).assignment_for("a", 0.0).readout_pool_indices == ()


def test_the_server_takes_only_a_clients_own_readout_indices_each_once() -> None:
    plan = plan_with_own_indices()
    a, b = (plan.assignment_for(c, 0.0).readout_pool_indices for c in "ab")
    check_report(plan, "a", report([(7, 0.1)], sorted((k, 0.5) for k in a)), max_abs_scalar=10)
    for readout in ([(b[0], 1.0)],                      # another client's
                    [(7, 1.0)],                         # a body pool index, not a readout one
                    [(a[0], 1.0), (a[0], 1.0)]):        # twice
        with pytest.raises(Refusal) as err:
            check_report(plan, "a", report([(7, 0.1)], readout), max_abs_scalar=10)
        assert err.value.code == "wrong_steps"


def own_assignment(readout_ks: tuple[int, ...]) -> Assignment:
    return Assignment(round=1, base_version=0, blocks=(0, 2), pool_indices=(3, 9, 12, 40),
                      hyper=READOUT, deadline_in_s=60, deadline_unix=0,
                      readout_pool_indices=readout_ks)


def test_a_client_measures_new_readout_directions_every_batch() -> None:
    trainer = readout_trainer()
    trainer.hold((0, 2))
    assert trainer.readout is not None
    own = (50, 51, 52, 60, 61, 62)  # two batches (4 steps, 2 directions each) x 3
    round_ = ReadoutRound.of(trainer.readout, trainer.run, own_assignment(own))
    assert round_ is not None
    assert [round_.pool_indices(t) for t in range(3)] == [[50, 51, 52], [60, 61, 62], []]
    outcome = trainer.train_round(own_assignment(own), threading.Event())
    assert [k for k, _ in outcome.readout_steps] == list(own)  # each measured once, none of the body's
    other = trainer.train_round(own_assignment((70, 71, 72, 80, 81, 82)), threading.Event())
    assert not {k for k, _ in other.readout_steps} & set(own)


def test_column_r_travels_apart_and_rebuilds_the_same_table() -> None:
    rng = np.random.default_rng(0)
    body_ks, readout_ks = (3, 9, 12), tuple(range(100, 292))  # 4 clients x 48
    ks = tuple(sorted(body_ks + readout_ks))
    blocks = (0, 5, 29, 30)  # 30: the readout's column R
    matrix = np.zeros((len(ks), len(blocks)))
    for i, k in enumerate(ks):
        if k in body_ks:
            matrix[i, :3] = rng.normal(size=3) * 1e-4
        else:
            matrix[i, 3] = rng.normal() * 1e-3
    dense = AlphaDelta.from_matrix(2, 3, ks, blocks, matrix)
    split = AlphaDelta.from_matrix(2, 3, ks, blocks, matrix, readout_block=30)
    assert split.readout_block == 30 and split.blocks == (0, 5, 29) and split.pool_indices == body_ks
    assert sorted(split.entries()) == sorted(dense.entries())
    tables = [np.zeros((1024, 31)), np.zeros((1024, 31))]
    dense.add_to_(tables[0])
    split.add_to_(tables[1])
    assert tables[0].tobytes() == tables[1].tobytes()
    assert decode(AlphaDelta, encode(split), max_bytes=MAX_REPORT_BYTES) == split
    # The readout's 192 floats cost 4 bytes each after a bitmap (at most 128 bytes for a pool
    # of 1,024) and the field names, not a row of 4 floats each.
    assert len(encode(dense)) - len(encode(split)) > 192 * 8
    assert len(encode(split)) - len(encode(dense_body(split))) < 192 * 4 + 128 + 60
    # A body-only delta is what it was.
    assert AlphaDelta.from_matrix(2, 3, body_ks, (0, 5), np.ones((3, 2))) == AlphaDelta.from_matrix(
        2, 3, body_ks, (0, 5), np.ones((3, 2)), readout_block=30)


def dense_body(delta: AlphaDelta) -> AlphaDelta:
    return dataclasses.replace(delta, readout_block=None, readout_rows=b"", readout_values=b"")


def test_the_wire_refuses_an_inconsistent_readout_part() -> None:
    good = AlphaDelta.from_matrix(1, 1, (4, 9), (0, 30), np.array([[1e-3, 0.0], [0.0, 2e-3]]), 30)
    assert good.readout_ks() == (9,)
    for bad in ({"readout_values": b""}, {"readout_block": None}, {"readout_block": 0},
                {"readout_rows": b"\x07"}):  # 3 bits: neither 3 float16 nor 3 float32
        with pytest.raises(ValueError):
            dataclasses.replace(good, **bad)


def test_a_round_with_own_readout_indices_stays_within_the_byte_budget() -> None:
    """A client of 3 batches x 16 readout directions (48 own indices): its report, and the
    assignment plus one delta of 4 such clients over 30 blocks and 12 shared body indices."""
    steps = [(900 + t, 1234.5678 + t) for t in range(12)]
    readout = [(t, -98.765432 + t) for t in range(600, 648)]
    up = len(encode(report(steps, readout)))
    assert up < 2048, up
    ks = tuple(range(900, 912)) + tuple(range(200, 392))
    blocks = tuple(range(31))
    matrix = np.zeros((len(ks), 31))
    matrix[:12, :30] = 1e-4
    matrix[12:, 30] = 1e-3
    delta = AlphaDelta.from_matrix(5, 6, tuple(sorted(ks)), blocks, matrix[np.argsort(ks)], readout_block=30)
    assignment = own_assignment(tuple(range(600, 648)))
    down = len(encode(NextRound("train", 5, assignment, (delta,))))
    readout_part = len(encode(delta)) - len(encode(dense_body(delta)))
    assert readout_part <= 192 * 4 + 128 + 60, readout_part
    assert down < 3 * 1024 and decode(NextRound, encode(NextRound("train", 5, assignment, (delta,))),
                                      max_bytes=MAX_REPORT_BYTES * 64).deltas == (delta,)
def test_own_readout_directions_are_aggregated_by_the_round_rule() -> None:
    """Each client's own directions enter column R at its weight's share of the round's mean
    (the rule treats R as any block: measured, applying each client's move as it moved hurt
    under label skew; docs/learning.md, "The readout's own directions")."""
    plan = plan_with_own_indices()
    a, b = (plan.assignment_for(c, 0.0).readout_pool_indices for c in "ab")
    received = {"a": ReceivedReport("a", report([(7, 1.0)], [(a[0], 2.0)]), b"", 1.0),
                "b": ReceivedReport("b", report([(7, 3.0)], [(b[0], -4.0)]), b"", 1.0)}
    outcome = decide_round(plan, received, {"a": 1.0, "b": 3.0}, min_reports=1,
                           aggregation=AggregationConfig(), readout_block=5)
    assert outcome.delta is not None
    alpha = np.zeros((64, 6))
    alpha[np.ix_(outcome.delta.pool_indices, outcome.delta.blocks)] = outcome.delta.values
    assert alpha[a[0], 5] == pytest.approx(0.05 * 2.0 * 1 / 4)
    assert alpha[b[0], 5] == pytest.approx(0.05 * -4.0 * 3 / 4)
    assert np.count_nonzero(alpha[:, 5]) == 2


def test_an_applied_rounds_readout_column_travels_as_float16_and_rebuilds_exactly() -> None:
    rng = np.random.default_rng(1)
    ks, blocks = tuple(range(10, 202)), (0, 30)
    matrix = np.zeros((192, 2), dtype=np.float32)
    matrix[:, 1] = rng.normal(size=192) * 1e-3
    matrix[:3, 0] = 1e-4
    rounded = with_half_column(RoundDelta(ks, blocks, matrix), 30)
    assert np.array_equal(rounded.values[:, 0], matrix[:, 0])  # the body's as it was
    assert np.abs(rounded.values[:, 1] - matrix[:, 1]).max() <= 1e-3 * 2.0 ** -10 * 4
    half = AlphaDelta.from_matrix(1, 1, ks, blocks, rounded.values, readout_block=30)
    full = AlphaDelta.from_matrix(1, 1, ks, blocks, matrix, readout_block=30)
    assert len(half.readout_values) == 2 * 192 and len(full.readout_values) == 4 * 192
    assert decode(AlphaDelta, encode(half), max_bytes=MAX_REPORT_BYTES) == half
    for delta, values in ((half, rounded.values), (full, matrix)):
        table, expected = np.zeros((256, 31)), np.zeros((256, 31))
        delta.add_to_(table)
        expected[np.ix_(ks, blocks)] += values.astype(np.float64)
        assert table.tobytes() == expected.tobytes()  # exactly what the server adds
    assert len(encode(half)) - len(encode(dense_body(half))) <= 192 * 2 + 128 + 60
    huge = np.array([[0.0, 1e6]], dtype=np.float32)  # no float16: kept, and sent as float32
    kept = with_half_column(RoundDelta((3,), blocks, huge), 30)
    assert kept.values[0, 1] == 1e6
    assert len(AlphaDelta.from_matrix(1, 1, (3,), blocks, kept.values, 30).readout_values) == 4
