"""A report's identity, and how a retry of it is answered (pure: no I/O, no clock).

A client that did not get a report's acknowledgement sends the same report again, with the
same idempotency key. The retry is answered with the original ack and changes nothing; the
same key on another report, or a second report for one round, is refused. A report's
identity is its content: the hash of its round and its canonical re-encoding.
"""

from __future__ import annotations

import hashlib

from zorba_common.codec import encode
from zorba_common.messages import Report, ReportAck
from zorba_server import errors
from zorba_server.rounds import ReceivedReport
from zorba_server.storage.store import StoredReport


def report_hash(round_: int, report: Report) -> bytes:
    """Content identity of a report (canonical re-encoding, so int-for-float is the same)."""
    return content_hash(round_, encode(report))


def content_hash(round_: int, encoded: bytes) -> bytes:
    """`report_hash` of a report whose canonical encoding (`encode(report)`) is at hand."""
    return hashlib.sha256(round_.to_bytes(8, "little") + encoded).digest()


def ack(round_: int, received: ReceivedReport) -> ReportAck:
    return ReportAck(round_, received.report.idempotency_key, received.received_at)


def check_retry(prior: ReceivedReport, round_: int, report: Report, digest: bytes) -> None:
    """`report` (content hash `digest`) comes from a client that reported in the open round
    already (`prior`): refuse it unless it is a retry of that report."""
    if prior.report.idempotency_key != report.idempotency_key:
        raise errors.conflict(
            "already_reported",
            f"client {prior.client_id} already reported for round {round_} (key "
            f"{prior.report.idempotency_key!r}); one report per round")
    if prior.body_hash != digest:
        raise idempotency_conflict(report.idempotency_key)


def stored_ack(found: StoredReport, round_: int, report: Report, digest: bytes) -> ReportAck:
    """A report whose key the store already holds (`found`), for a round that is not open:
    the original ack for a retry, else a conflict."""
    if found.round == round_ and found.body_hash == digest:
        return ReportAck(round_, report.idempotency_key, found.received_at)
    raise idempotency_conflict(report.idempotency_key)


def idempotency_conflict(key: str) -> errors.Refusal:
    return errors.conflict(
        "idempotency_conflict",
        f"idempotency key {key!r} was already used for a different report: a retry must resend "
        "the same report, a new report needs a new key",
    )
