"""The Flower codec: zorba messages survive a trip through Flower records and Flower's own
protobuf wire format unchanged, and anything else is a SchemaError that says what was wrong."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower app needs the `flower` extra (pip install -e '.[flower]')")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto  # noqa: E402
from server_fakes import FINGERPRINT, FOOTPRINT, profile  # noqa: E402

from zorba_common.codec import SchemaError
from zorba_common.messages import AlphaDelta, Assignment, HyperParams, Report, RunInfo
from zorba_flower import codec  # noqa: E402

HYPER = HyperParams(lr=0.01, mu=1e-3, batch_size=4, seq_len=16)


def over_the_wire(content: RecordDict) -> RecordDict:
    """What the receiver sees: Flower's protobuf serialisation and back."""
    return recorddict_from_proto(recorddict_to_proto(content))


def instruction() -> codec.TrainInstruction:
    run = RunInfo("flower-run", 3, 8, 4, FINGERPRINT, HYPER, 30.0, 5.0, 1e6)
    assignment = Assignment(5, 2, (0, 3), (7, 1, 4), HYPER, 29.5, 1.7e9)
    history = (AlphaDelta.from_matrix(1, 2, (0,), (1,), np.array([[1 / 7]])),
               AlphaDelta.from_matrix(2, 4, (1, 7), (0, 3), np.array([[0.5, -0.25], [1.0, 2.0]])))
    return codec.TrainInstruction(run, assignment, history)


def test_a_train_instruction_round_trips_with_the_history_bit_for_bit() -> None:
    sent = instruction()
    got = codec.read_train_instruction(over_the_wire(codec.train_instruction(sent)))
    assert got == sent
    assert [d.values for d in got.deltas] == [d.values for d in sent.deltas]
    assert got.deltas[1].entries() == sent.deltas[1].entries()


def test_a_report_round_trips_with_its_scalars_exact() -> None:
    report = Report("key-1", 2, ((7, 0.1 + 0.2), (1, -3.5e-8)), 12, 0.75, 0.5, 123456, 0.02)
    got = codec.read_train_reply(over_the_wire(codec.report_reply(report)))
    assert got == report and got.steps[0][1] == 0.1 + 0.2


def test_a_decline_is_told_apart_from_a_report() -> None:
    got = codec.read_train_reply(over_the_wire(codec.decline_reply("no step before the deadline")))
    assert got == codec.Decline("no step before the deadline")


def test_a_profile_and_a_query_round_trip() -> None:
    p = profile(42, budget=3 * 2**20, name="node-1")
    assert codec.read_profile(over_the_wire(codec.profile_reply(p, 7))) == (p, 7)
    assert p.footprint == FOOTPRINT
    query = codec.ProfileQuery(batch_size=4, seq_len=16)
    assert codec.read_profile_query(over_the_wire(codec.profile_query(query))) == query


def test_a_message_from_another_app_is_refused_with_what_was_missing() -> None:
    with pytest.raises(SchemaError, match="no 'zorba' ConfigRecord"):
        codec.read_train_reply(RecordDict({"other": ConfigRecord({"x": 1})}))
    with pytest.raises(SchemaError, match="no 'report' entry"):
        codec.read_train_reply(RecordDict({"zorba": ConfigRecord({"x": 1})}))


def test_an_invalid_report_is_refused_by_the_protocol_decoder() -> None:
    fields = {"idempotency_key": "k", "base_version": 0, "steps": [[1, float("nan")]],
              "num_samples": 1, "loss_mean": 0.1, "loss_last": 0.1, "peak_memory_bytes": 0,
              "step_time_s": 0.0}
    content = RecordDict({"zorba": ConfigRecord({"report": msgpack.packb(fields)})})
    with pytest.raises(SchemaError, match=r"steps\[0\]\[1\].*not a finite number"):
        codec.read_train_reply(over_the_wire(content))


def test_a_profile_without_a_valid_partition_is_refused() -> None:
    content = codec.profile_reply(profile(42), 0)
    content["zorba"]["partition"] = -1
    with pytest.raises(SchemaError, match="partition-id"):
        codec.read_profile(over_the_wire(content))
    del content["zorba"]["partition"]
    with pytest.raises(SchemaError, match="partition is None"):
        codec.read_profile(over_the_wire(content))


def test_a_query_from_another_protocol_version_is_refused() -> None:
    query = codec.profile_query(codec.ProfileQuery(4, 16, protocol=99))
    with pytest.raises(SchemaError, match="protocol 99"):
        codec.read_profile_query(query)
