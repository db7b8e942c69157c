"""The server's pure identity rules: who may register, whose bearer token a request carries
(zorba_server/enrolment.py), and what a resent report is answered (zorba_server/idempotency.py). The
HTTP tests (test_server_api.py) prove the same refusals through the app."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from server_fakes import SECRET, make_report, profile

from zorba_common.messages import PROTOCOL_VERSION, Assignment, HyperParams, RegisterRequest
from zorba_server.enrolment import Credentials, Tokens, check_enrolment, token_hash
from zorba_server.errors import Conflict, Forbidden, Malformed, Unauthenticated
from zorba_server.idempotency import check_retry, report_hash, stored_ack
from zorba_server.rounds import ReceivedReport
from zorba_server.storage import StoredReport

ASSIGNMENT = Assignment(round=3, base_version=2, blocks=(0,), pool_indices=(5, 9),
                        hyper=HyperParams(0.01, 1e-3, 2, 8), deadline_in_s=30.0,
                        deadline_unix=100.0)


def test_a_registration_needs_the_run_secret_and_this_protocol_version() -> None:
    check_enrolment(RegisterRequest(SECRET, profile()), SECRET)
    with pytest.raises(Forbidden, match="wrong enrolment secret"):
        check_enrolment(RegisterRequest(SECRET + "x", profile()), SECRET)
    with pytest.raises(Malformed, match="protocol") as old:
        check_enrolment(RegisterRequest(SECRET, profile(), protocol=PROTOCOL_VERSION - 1), SECRET)
    assert old.value.code == "protocol_version"


def test_a_bearer_token_names_its_member_and_only_its_hash_is_kept() -> None:
    new = Credentials.new()
    assert new.token_hash == hashlib.sha256(new.token.encode()).digest() == token_hash(new.token)
    assert Credentials.new().client_id != new.client_id
    tokens = Tokens()
    tokens.add(new.token_hash, new.client_id)
    members = {new.client_id: "the member"}
    assert tokens.holder(new.token, members) == "the member"
    for token, why in ((None, "missing"), ("", "missing"), ("other", "unknown")):
        with pytest.raises(Unauthenticated, match=why):
            tokens.holder(token, members)
    with pytest.raises(Unauthenticated, match="unknown"):  # a token whose member is gone
        tokens.holder(new.token, {})


def test_a_report_is_identified_by_its_content_and_round() -> None:
    report = make_report(ASSIGNMENT, key="k")
    assert report_hash(3, report) == report_hash(3, dataclasses.replace(report))
    assert report_hash(4, report) != report_hash(3, report)
    assert report_hash(3, dataclasses.replace(report, loss_mean=2.0)) != report_hash(3, report)


def test_a_resent_report_is_a_retry_only_with_its_key_and_content() -> None:
    report = make_report(ASSIGNMENT, key="k")
    prior = ReceivedReport("c-1", report, report_hash(3, report), 50.0)
    check_retry(prior, 3, report, report_hash(3, report))  # the same report: a retry
    other = make_report(ASSIGNMENT, key="k2")
    with pytest.raises(Conflict, match="already reported") as second:
        check_retry(prior, 3, other, report_hash(3, other))
    assert second.value.code == "already_reported"
    changed = dataclasses.replace(report, loss_mean=2.0)
    with pytest.raises(Conflict) as reused:
        check_retry(prior, 3, changed, report_hash(3, changed))
    assert reused.value.code == "idempotency_conflict"


def test_a_stored_report_of_a_closed_round_is_answered_its_original_ack() -> None:
    report = make_report(ASSIGNMENT, key="k")
    found = StoredReport(3, report_hash(3, report), 50.0)
    ack = stored_ack(found, 3, report, report_hash(3, report))
    assert (ack.round, ack.idempotency_key, ack.received_at) == (3, "k", 50.0)
    for round_, body in ((4, report), (3, dataclasses.replace(report, loss_mean=2.0))):
        with pytest.raises(Conflict) as refused:
            stored_ack(found, round_, body, report_hash(round_, body))
        assert refused.value.code == "idempotency_conflict"
