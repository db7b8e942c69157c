"""Enrolment that resists guessing (issue 27): failed enrolments are rate limited per source
address (429 with Retry-After, a growing delay), counted in /metrics; a short secret is refused
unless the operator says --insecure-secret."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from server_fakes import FakeClient, config_dict

from zorba_server import enrolment_limit
from zorba_server.app import create_app
from zorba_server.cli import config_from_args, parse_args
from zorba_server.config import ConfigError, config_from_dict
from zorba_server.enrolment_limit import FREE_FAILURES, MAX_DELAY_S, EnrolmentLimiter
from zorba_server.errors import TooManyRequests


def test_free_failures_then_a_delay_that_doubles_up_to_its_cap() -> None:
    limiter = EnrolmentLimiter()
    delays = [limiter.failed("10.0.0.1", 0.0) for _ in range(FREE_FAILURES + 20)]
    assert delays[:FREE_FAILURES] == [0.0] * FREE_FAILURES
    assert delays[FREE_FAILURES:FREE_FAILURES + 4] == [1.0, 2.0, 4.0, 8.0]
    assert max(delays) == MAX_DELAY_S
    with pytest.raises(TooManyRequests) as caught:
        limiter.check("10.0.0.1", 10.0)
    assert caught.value.retry_after_s == MAX_DELAY_S - 10.0
    limiter.check("10.0.0.2", 10.0)  # another source is not held up
    limiter.check("10.0.0.1", MAX_DELAY_S)  # waited out
    assert limiter.throttled(10.0) == 1


def test_a_success_or_a_quiet_hour_clears_a_source(monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = EnrolmentLimiter()
    for _ in range(FREE_FAILURES):
        limiter.failed("a", 0.0)
    limiter.succeeded("a")
    assert limiter.failed("a", 0.0) == 0.0  # counting from zero again
    for _ in range(FREE_FAILURES):
        limiter.failed("b", 0.0)
    assert limiter.failed("b", enrolment_limit.FORGET_AFTER_S + 1.0) == 0.0
    monkeypatch.setattr(enrolment_limit, "MAX_SOURCES", 3)
    for i in range(10):
        limiter.failed(f"s{i}", 0.0)
    assert limiter.throttled(0.0) <= 3 and len(limiter._sources) == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_a_guesser_gets_429_with_retry_after_and_the_failures_are_counted(
        tmp_path: Path, aiohttp_client: Any) -> None:
    clock = FakeClock()
    app = create_app(config_from_dict(config_dict(tmp_path / "db.sqlite3")), clock=clock)
    http = await aiohttp_client(app)
    guesser = FakeClient(http)
    for _ in range(FREE_FAILURES + 1):  # the last one sets the first delay
        assert (await guesser.register(secret="a-wrong-guess-123")).status == 403
    throttled = await http.post("/v1/clients", data=b"\x80",
                                headers={"Content-Type": "application/msgpack"})
    assert throttled.status == 429 and throttled.headers["Retry-After"] == "1"
    answer = await guesser.register()  # even the right secret waits its turn
    assert (answer.status, answer.error) == (429, "enrolment_throttled")
    assert "retry in 1 s" in answer.body["message"]
    clock.now += 1.0
    assert (await guesser.register()).status == 201  # waited: the right secret gets in
    assert (await guesser.register(secret="a-wrong-guess-123")).status == 403  # reset by it
    metrics = await (await http.get("/metrics")).text()
    assert f'zorba_enrolment_failures_total{{outcome="wrong_secret"}} {FREE_FAILURES + 2}.0' in metrics
    assert 'zorba_enrolment_failures_total{outcome="throttled"} 2.0' in metrics


def test_a_short_secret_is_refused_unless_the_operator_says_it_is_a_throwaway_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZORBA_ENROLMENT_SECRET", "change-me")
    with pytest.raises(ConfigError, match="at least 16 characters .*zorba-server secret"):
        config_from_args(parse_args(["--db", str(tmp_path / "db")]))
    config = config_from_args(parse_args(["--db", str(tmp_path / "db"), "--insecure-secret"]))
    assert config.insecure_secret and config.enrolment_secret == "change-me"
