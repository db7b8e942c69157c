"""Run modes, the client's side: one file per mode family, `CLIENT_MODES` keyed by `run.mode`.
The server's side of each mode is zorba_server.modes; the names are
zorba_common.run_defaults.RUN_MODES (a RunInfo carrying another is refused when decoded).

A new mode is a `ClientMode` (its trainer, its round hooks, whether it keeps the budget) in a
file here and an entry in CLIENT_MODES; the daemon needs no change.
"""

from __future__ import annotations

from zorba_common.run_defaults import FEDAVG, FEDZO_FULL, ZORBA, ZORBA_UNIFORM
from zorba_edge.client.modes import fedavg, zeroth_order
from zorba_edge.client.modes.client_mode import ClientMode, MakeTrainer, RoundHooks, RoundIO, Trainer

CLIENT_MODES: dict[str, ClientMode] = {
    ZORBA: zeroth_order.MODE, ZORBA_UNIFORM: zeroth_order.MODE, FEDZO_FULL: zeroth_order.MODE,
    FEDAVG: fedavg.MODE,
}
"""run.mode -> how this client trains it."""

__all__ = ["CLIENT_MODES", "ClientMode", "MakeTrainer", "RoundHooks", "RoundIO", "Trainer"]
