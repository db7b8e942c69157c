"""zorba-edge's messages inside Flower records.

Each Flower message carries one `ConfigRecord` under the key `zorba`, whose one entry is the
msgpack body of a protocol message (`zorba_common.messages`). The same strict decoder the
HTTP server uses validates it, so a Flower peer gets no looser a check than an HTTP one and
there is one definition of every field. Flower itself moves the bytes (protobuf, gRPC).

    QUERY  server -> node   ProfileQuery        node -> server   DeviceProfile, partition id
    TRAIN  server -> node   TrainInstruction    node -> server   Report, or a decline
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from zorba_common.codec import SchemaError, decode, encode, wire
from zorba_common.limits import MAX_REGISTER_BYTES, MAX_REPORT_BYTES, MAX_RESPONSE_BYTES
from zorba_common.messages import PROTOCOL_VERSION, AlphaDelta, Assignment, DeviceProfile, Report, RunInfo

RECORD = "zorba"
"""The ConfigRecord every zorba message travels in."""
TIMING = "zorba-timing"
"""The MetricRecord of a TRAIN reply: what the node measured of its handling."""
T = TypeVar("T")


@dataclass(frozen=True)
class ProfileQuery:
    """QUERY: describe this node for the run's batch shape."""

    batch_size: int = field(metadata=wire("The run's batch size.", ge=1))
    seq_len: int = field(metadata=wire("The run's sequence length.", unit="tokens", ge=1))
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class TrainInstruction:
    """TRAIN: one node's round.

    A Deployment Engine node starts a fresh process for every message and a Simulation
    Engine actor may serve another node than last round, so the server cannot know which
    version the receiving process holds (0 for a fresh one): the run's whole history
    travels, every published delta from version 1 to the assignment's base version. A
    process at version u applies u+1..v in place; a fresh one replays from base
    (zorba_flower/history_trainer.py). The table is their sum, so it does not travel.
    """

    run: RunInfo
    assignment: Assignment
    deltas: tuple[AlphaDelta, ...] = ()
    """Every delta the run published, versions 1..assignment.base_version in order."""


@dataclass(frozen=True)
class Decline:
    """TRAIN reply without a report: the node ran no step (why, for the server's log)."""

    reason: str = field(metadata=wire("Why no step was run.", max_len=4096))


def _pack(kind: str, message: Any) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({kind: encode(message)})})


def _unpack(content: RecordDict, kind: str, cls: type[T], max_bytes: int) -> T:
    record = content.config_records.get(RECORD) if RECORD in content else None
    if record is None:
        raise SchemaError(
            f"the message has no {RECORD!r} ConfigRecord (records: {sorted(content)}): it was not "
            "sent by the zorba Flower app; check that server and client run the same app")
    body = record.get(kind)
    if not isinstance(body, bytes):
        raise SchemaError(
            f"the {RECORD!r} record has no {kind!r} entry (entries: {sorted(record)}): expected "
            f"a {cls.__name__}; is the peer running the same zorba-flower version?")
    return decode(cls, body, max_bytes=max_bytes)


def _has(content: RecordDict, kind: str) -> bool:
    return RECORD in content.config_records and kind in content.config_records[RECORD]


def profile_query(query: ProfileQuery) -> RecordDict:
    return _pack("query", query)


def read_profile_query(content: RecordDict) -> ProfileQuery:
    query = _unpack(content, "query", ProfileQuery, MAX_REGISTER_BYTES)
    if query.protocol != PROTOCOL_VERSION:
        raise SchemaError(f"the server speaks protocol {query.protocol}, this node "
                          f"{PROTOCOL_VERSION}: run the same zorba-edge version on both")
    return query


MAX_PARTITIONS = 10**6
"""Partition ids are below this: client ids hold them as 6 digits (server_loop.client_id)."""


def profile_reply(profile: DeviceProfile, partition: int) -> RecordDict:
    """The node's profile, and the data partition it holds (its `partition-id`)."""
    return RecordDict({RECORD: ConfigRecord({"profile": encode(profile), "partition": partition})})


def read_profile(content: RecordDict) -> tuple[DeviceProfile, int]:
    """A QUERY reply: the node's profile and its partition id."""
    profile = _unpack(content, "profile", DeviceProfile, MAX_REGISTER_BYTES)
    partition = content.config_records[RECORD].get("partition")
    if not isinstance(partition, int) or isinstance(partition, bool) or not (
            0 <= partition < MAX_PARTITIONS):
        raise SchemaError(
            f"the profile reply's partition is {partition!r}, expected a partition id in "
            f"[0, {MAX_PARTITIONS}): set the node's partition-id (--node-config) in that range "
            "and run the same zorba-flower version on server and nodes")
    return profile, partition


def train_instruction(instruction: TrainInstruction) -> RecordDict:
    return _pack("train", instruction)


def read_train_instruction(content: RecordDict) -> TrainInstruction:
    return _unpack(content, "train", TrainInstruction, MAX_RESPONSE_BYTES)


@dataclass(frozen=True)
class Timing:
    """A node's own measure of one TRAIN message: for Flower's per-round overhead figure."""

    handler_s: float
    """From the message reaching the ClientApp to its reply (sync, model load, training)."""
    train_s: float
    """The local steps alone."""
    rss_peak_bytes: int
    """Peak resident memory of the process that handled it."""


@dataclass(frozen=True)
class TrainOutcome:
    """A node's handling of one TRAIN message, wherever it ran (this process or a local worker)."""

    answer: Report | Decline
    timing: Timing
    batches_drawn: int
    """Where the node's batch stream stands after the round (the node keeps it)."""


def report_reply(report: Report, timing: Timing | None = None) -> RecordDict:
    content = _pack("report", report)
    if timing is not None:
        content[TIMING] = MetricRecord({"handler_s": timing.handler_s, "train_s": timing.train_s,
                                        "rss_peak_bytes": timing.rss_peak_bytes})
    return content


def read_timing(content: RecordDict) -> Timing | None:
    """The reply's timing, or None when the node sent none (it is informational only)."""
    record = content.metric_records.get(TIMING) if TIMING in content else None
    if record is None:
        return None
    try:
        handler_s, train_s, rss = record["handler_s"], record["train_s"], record["rss_peak_bytes"]
        if isinstance(handler_s, list) or isinstance(train_s, list) or isinstance(rss, list):
            return None  # a record may hold lists; timing is three numbers
        return Timing(float(handler_s), float(train_s), int(rss))
    except (KeyError, ValueError):
        return None


def decline_reply(reason: str) -> RecordDict:
    return _pack("decline", Decline(reason[:4096]))


def read_train_reply(content: RecordDict) -> Report | Decline:
    """A node's answer to TRAIN: its report, or why it has none."""
    if _has(content, "decline"):
        return _unpack(content, "decline", Decline, MAX_REGISTER_BYTES)
    return _unpack(content, "report", Report, MAX_REPORT_BYTES)
