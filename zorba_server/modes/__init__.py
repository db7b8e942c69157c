"""Run modes, one file each: the server's side of `run.mode` (how a round is planned and what it
carries). The config's check and `zorba-server --mode` read their choices from `MODES`; the
wire's list of names stays `zorba_common.run_defaults.RUN_MODES`, which MODES covers exactly.

A new mode is a file defining `MODE = RunMode(...)`, its name in RUN_MODES, an entry here, and
its tests (and its client side in zorba_edge/client/run_modes.py).
"""

from __future__ import annotations

from zorba_server.modes import fedavg, fedzo_full, zorba, zorba_uniform
from zorba_server.modes.run_mode import RunMode, SolveFn

MODES: dict[str, RunMode] = {m.name: m for m in (zorba.MODE, zorba_uniform.MODE,
                                                 fedzo_full.MODE, fedavg.MODE)}
"""run.mode -> its RunMode, the default first."""

__all__ = ["MODES", "RunMode", "SolveFn"]
