"""Bytes on each client's wire, per round, counted by the server from the bodies it receives
and sends (so every client shows them, whatever its version).

A client's round is the traffic from after its previous report up to and including this
one: its long-polls, the deltas or table it synced, fedavg's weights, the report and its ack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClientTraffic:
    up: int = 0
    """Request body bytes since the last report."""
    down: int = 0
    """Response body bytes since the last report."""
    last_round_up: int | None = None
    last_round_down: int | None = None
    """The last reported round's bytes (None: it has not reported since the server started)."""

    def add(self, up: int, down: int, *, reported: bool) -> None:
        self.up += up
        self.down += down
        if reported:
            self.last_round_up, self.last_round_down = self.up, self.down
            self.up = self.down = 0
