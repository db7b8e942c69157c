"""The wire schema: every message round-trips, and every malformed body is refused by name."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from zorba_common.codec import SchemaError, decode, encode, from_wire
from zorba_common.limits import MAX_REPORT_BYTES, MAX_STEPS_PER_REPORT
from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import (
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
    # A non-finite value outside the gradients is a malformed message, not a bad scalar.
    (_report_dict(loss_mean=float("inf")), "loss_mean", "invalid_message"),
    (_report_dict(step_time_s=float("nan")), "step_time_s", "invalid_message"),
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


def _register_dict() -> dict[str, Any]:
    return msgpack.unpackb(encode(MESSAGES[1]))


def _map_with_repeated_key(key: str, first: Any, last: Any, rest: dict[str, Any]) -> bytes:
    """A msgpack map whose `key` appears twice (msgpack.packb cannot write one from a dict)."""
    items = [(key, first), *rest.items(), (key, last)]
    return b"".join([bytes([0xDE]), len(items).to_bytes(2, "big"),
                     *(msgpack.packb(k) + msgpack.packb(v) for k, v in items)])


def test_a_map_with_a_repeated_key_is_refused_not_last_one_wins() -> None:
    body = _report_dict()
    data = _map_with_repeated_key("loss_mean", 1.0, 2.0,
                                  {k: v for k, v in body.items() if k != "loss_mean"})
    assert msgpack.unpackb(data)["loss_mean"] == 2.0  # what a plain decoder would take
    with pytest.raises(SchemaError, match="'loss_mean' appears more than once") as err:
        decode(Report, data, max_bytes=MAX_REPORT_BYTES)
    assert err.value.code == "invalid_message"


def test_a_repeated_key_in_a_nested_map_is_refused() -> None:
    reg = _register_dict()
    profile = reg.pop("profile")
    footprint = profile.pop("footprint")
    inner = _map_with_repeated_key("hidden_size", 8, 9,
                                   {k: v for k, v in footprint.items() if k != "hidden_size"})
    packed_profile = _splice(profile, "footprint", inner)
    data = _splice(reg, "profile", packed_profile)
    with pytest.raises(SchemaError, match="'hidden_size' appears more than once"):
        decode(RegisterRequest, data, max_bytes=MAX_REPORT_BYTES)


def _splice(body: dict[str, Any], key: str, packed: bytes) -> bytes:
    """`body` plus `key` whose value is the already-packed bytes `packed`."""
    return b"".join([bytes([0xDE]), (len(body) + 1).to_bytes(2, "big"),
                     *(msgpack.packb(k) + msgpack.packb(v) for k, v in body.items()),
                     msgpack.packb(key), packed])


BAD_FOOTPRINTS: dict[str, tuple[dict[str, Any], str]] = {
    # name: (changes to the footprint, words the error must contain)
    "empty block list": ({"block_params": [], "quantizable_block_params": [], "num_layers": 0},
                         "block_params: 0 items, at least 1 needed"),
    "negative block": ({"block_params": [-10, 12]}, "block_params[0]: -10 is below the minimum 1"),
    "zero block": ({"block_params": [0, 12], "quantizable_block_params": [0, 9]},
                   "block_params[0]: 0 is below the minimum 1"),
    "quantizable above block": ({"quantizable_block_params": [8, 13]},
                                "quantizable_block_params[1]: 13 exceeds the block's 12"),
    "negative quantizable": ({"quantizable_block_params": [-1, 9]}, "below the minimum 0"),
    "zero hidden size": ({"hidden_size": 0}, "hidden_size: 0 is below the minimum 1"),
    "zero vocabulary": ({"vocab_size": 0}, "vocab_size: 0 is below the minimum 1"),
    "huge vocabulary": ({"vocab_size": 2**40}, "above the maximum"),
    "zero intermediate": ({"intermediate_size": 0}, "intermediate_size"),
    "no embeddings": ({"embed_head_params": 0}, "embed_head_params"),
    "too many blocks": ({"block_params": [1] * 5000, "quantizable_block_params": [0] * 5000,
                         "num_layers": 5000}, "exceed the limit"),
    "absurd parameter count": ({"block_params": [10**13, 10**13]},
                               "parameters in all exceed the limit"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOOTPRINTS))
def test_a_footprint_without_meaning_is_refused(case: str) -> None:
    changes, needle = BAD_FOOTPRINTS[case]
    reg = _register_dict()
    reg["profile"]["footprint"].update(changes)
    with pytest.raises(SchemaError) as err:
        from_wire(RegisterRequest, reg)
    assert needle in str(err.value)


def test_an_empty_model_fingerprint_is_refused() -> None:
    reg = _register_dict()
    reg["profile"]["model_fingerprint"] = ""
    with pytest.raises(SchemaError, match="model_fingerprint: must not be empty"):
        from_wire(RegisterRequest, reg)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"loss_mean": 1e308}, "loss_mean: 1e+308 is above the maximum"),
    ({"loss_last": -0.5}, "loss_last: -0.5 is below the minimum"),
    ({"peak_memory_bytes": 2**63 - 1}, "peak_memory_bytes"),
    ({"step_time_s": 1e12}, "step_time_s"),
    ({"base_version": 2**60}, "base_version"),
    ({"num_samples": 2**62}, "num_samples"),
])
def test_implausible_report_values_are_refused(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(SchemaError) as err:
        from_wire(Report, _report_dict(**changes))
    assert needle in str(err.value) and err.value.code == "invalid_message"


def test_implausible_device_values_are_refused() -> None:
    for name, value in (("memory_budget_bytes", 2**63 - 1), ("step_time_s", 1e300),
                        ("num_samples", 2**63)):
        reg = _register_dict()
        reg["profile"][name] = value
        with pytest.raises(SchemaError, match=name):
            from_wire(RegisterRequest, reg)


def test_negative_indices_in_a_list_are_refused_naming_the_item() -> None:
    body = msgpack.unpackb(encode(ASSIGNMENT))
    body["pool_indices"] = [5, -1]
    with pytest.raises(SchemaError, match=r"pool_indices\[1\]: -1 is below the minimum 0"):
        from_wire(Assignment, body)
