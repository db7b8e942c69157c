"""Bytes on each client's wire, per round, counted by the server from the bodies it receives
and sends (so every client shows them, whatever its version).

A client's round is the traffic from after its previous report up to and including this
one: its long-polls, the deltas or table it synced, fedavg's weights, the report and its ack.
The running count lives in memory; the figures of the round a report ends are stored in that
report's row (one write the server makes anyway), so a restart shows the same last round.
A retry of a report that is stored already ends no round: its bytes count toward the next.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundBytes:
    """Body bytes of one client's round: `up` its requests', `down` the server's answers'."""

    up: int
    down: int


@dataclass
class ClientTraffic:
    up: int = 0
    """Request body bytes since the last stored report (not stored: a restart restarts it)."""
    down: int = 0
    """Response body bytes since the last stored report."""
    last_round: RoundBytes | None = None
    """The last reported round's bytes (None: no report yet, or only reports stored by a server
    that did not count bytes)."""

    def add(self, up: int, down: int) -> None:
        self.up += up
        self.down += down

    def end_round(self, report_up: int, ack_down: int) -> RoundBytes:
        """The bytes of the round a new report ends: the running count plus the report's body
        and its ack's. They leave the running count now (the report's row stores them); call
        `stored` or `not_stored` when its commit is done."""
        ended = RoundBytes(self.up + report_up, self.down + ack_down)
        self.up = self.down = 0
        return ended

    def stored(self, ended: RoundBytes) -> None:
        self.last_round = ended

    def not_stored(self, ended: RoundBytes, report_up: int, ack_down: int) -> None:
        """The report was refused after all: what `end_round` took goes back, less the report
        and the ack (the refusal is counted as any answer, by the HTTP layer)."""
        self.add(ended.up - report_up, ended.down - ack_down)
