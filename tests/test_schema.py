"""The wire schema: every message round-trips, and every malformed body is refused by name."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from zorba_edge.common.memory_model import ModelFootprint
from zorba_edge.common.schema import (
    MAX_REPORT_BYTES,
    MAX_STEPS_PER_REPORT,
    TRAIN,
    AlphaDelta,
    AlphaState,
    Assignment,
    DeviceProfile,
    ErrorBody,
    HyperParams,
    MemoryProfile,
    NextRound,
    RegisterRequest,
    RegisterResponse,
    Report,
    ReportAck,
    RunInfo,
    SchemaError,
    decode,
    encode,
    from_wire,
)

FP = ModelFootprint((10, 12), (8, 9), 50, 8, 10, 2, 16)
HYPER = HyperParams(1e-6, 1e-3, 8, 64)
ASSIGNMENT = Assignment(3, 2, (0, 1), (5, 9, 5), HYPER, 12.5, 1.7e9)
DELTA = AlphaDelta.from_matrix(3, 4, (5, 9), (0, 1), np.array([[1.5, 0.0], [-2.0, 0.25]]))
REPORT = Report("key-1", 2, ((5, 0.5), (9, -1.25), (5, 3)), 24, 1.1, 0.9, 123, 0.02)

MESSAGES: list[Any] = [
    ErrorBody("round_closed", "round 3 closed"),
    RegisterRequest("secret", DeviceProfile("cuda", 2**33, 0.05, 1000, FP, "fp", MemoryProfile(
        train_dtype="bf16", snapshot_dtype=None), "jetson")),
    RegisterResponse("c-1", "tok",
                     RunInfo("run", 2**40 + 5, 1024, 2, "fp", HYPER, 300.0, 25.0, 1e6)),
    NextRound(TRAIN, 2, ASSIGNMENT, (DELTA,)),
    NextRound("wait", 2, None, (), True, 1.0, "waiting"),
    REPORT,
    ReportAck(3, "key-1", 1.7e9),
    AlphaState("run", 4, 3, 2, np.arange(6, dtype="<f8").tobytes()),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_msgpack(message: Any) -> None:
    assert decode(type(message), encode(message), max_bytes=MAX_REPORT_BYTES) == message


def test_int_is_accepted_where_a_float_goes_and_becomes_a_float() -> None:
    decoded = decode(Report, encode(REPORT), max_bytes=MAX_REPORT_BYTES)
    assert decoded.steps[2] == (5, 3.0) and isinstance(decoded.steps[2][1], float)


def test_delta_entries_give_the_non_zero_increments_k_major() -> None:
    assert DELTA.entries() == [(5, 0, 1.5), (9, 0, -2.0), (9, 1, 0.25)]


def _report_dict(**changes: Any) -> dict[str, Any]:
    body = msgpack.unpackb(encode(REPORT))
    body.update(changes)
    return body


@pytest.mark.parametrize(("body", "needle", "code"), [
    (_report_dict(steps=[[5, float("nan")]]), "steps[0][1]", "invalid_scalar"),
    (_report_dict(loss_mean=float("inf")), "loss_mean", "invalid_scalar"),
    (_report_dict(steps=[[True, 0.5]]), "expected an integer, got a bool", "invalid_message"),
    (_report_dict(steps=[[5, "0.5"]]), "expected a number", "invalid_message"),
    (_report_dict(steps=[[5]]), "list of 2 items", "invalid_message"),
    (_report_dict(idempotency_key=""), "must not be empty", "invalid_message"),
    (_report_dict(idempotency_key="x" * 129), "exceeds the limit of 128", "too_large"),
    (_report_dict(num_samples=-3), "below the minimum", "invalid_message"),
    (_report_dict(surprise=1), "unknown field", "invalid_message"),
    ({k: v for k, v in _report_dict().items() if k != "base_version"}, "base_version: missing",
     "invalid_message"),
    (_report_dict(steps=[[0, 0.0]] * (MAX_STEPS_PER_REPORT + 1)), "exceed the limit",
     "too_large"),
    ([1, 2], "expected a map", "invalid_message"),
])
def test_a_malformed_report_is_refused_naming_the_field(body: Any, needle: str, code: str) -> None:
    with pytest.raises(SchemaError) as err:
        from_wire(Report, body)
    assert needle in str(err.value) and err.value.code == code


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", msgpack.packb({1: 2}),
                                  msgpack.packb({"a": 1}) + b"\x00"])
def test_bytes_that_are_not_one_msgpack_map_are_refused(data: bytes) -> None:
    with pytest.raises(SchemaError):
        decode(Report, data, max_bytes=1000)


def test_a_body_over_its_byte_limit_is_refused_before_parsing() -> None:
    with pytest.raises(SchemaError) as err:
        decode(Report, encode(REPORT), max_bytes=10)
    assert err.value.code == "too_large"


def test_nested_model_validation_errors_become_schema_errors() -> None:
    reg = msgpack.unpackb(encode(MESSAGES[1]))
    reg["profile"]["footprint"]["num_layers"] = 3  # 2 blocks listed
    with pytest.raises(SchemaError, match="3-layer model"):
        from_wire(RegisterRequest, reg)
    reg = msgpack.unpackb(encode(MESSAGES[1]))
    reg["profile"]["memory"]["frozen_dtype"] = "int3"
    with pytest.raises(SchemaError, match="frozen_dtype"):
        from_wire(RegisterRequest, reg)


def test_inconsistent_table_sizes_are_refused() -> None:
    with pytest.raises(SchemaError, match="expected 16"):
        dataclasses.replace(DELTA, values=b"\x00" * 12)
    with pytest.raises(SchemaError, match="float64"):
        AlphaState("run", 0, 3, 2, b"\x00" * 24)


def test_train_answers_need_an_assignment_and_others_must_not_have_one() -> None:
    with pytest.raises(SchemaError):
        NextRound(TRAIN, 0)
    with pytest.raises(SchemaError):
        NextRound("wait", 0, ASSIGNMENT)
    with pytest.raises(SchemaError):
        NextRound("sleep", 0)
