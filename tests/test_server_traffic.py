"""Each client's bytes per round (zorba_server/traffic.py): what a report ends, and what a refused
report gives back."""

from __future__ import annotations

from zorba_server.traffic import ClientTraffic, RoundBytes


def test_a_report_ends_its_round_with_its_own_body_and_ack() -> None:
    t = ClientTraffic()
    t.add(0, 400)  # a long-poll's assignment
    t.add(0, 30)  # a poll that waited
    ended = t.end_round(250, 40)
    assert ended == RoundBytes(250, 470) and (t.up, t.down) == (0, 0)
    assert t.last_round is None  # not shown before its row is committed
    t.stored(ended)
    assert t.last_round == ended


def test_a_refused_report_leaves_the_round_running_without_its_own_bodies() -> None:
    t = ClientTraffic(last_round=RoundBytes(1, 2))
    t.add(0, 400)
    ended = t.end_round(250, 40)
    t.add(0, 30)  # another request of the client while the commit was in flight
    t.not_stored(ended, 250, 40)
    assert (t.up, t.down, t.last_round) == (0, 430, RoundBytes(1, 2))
