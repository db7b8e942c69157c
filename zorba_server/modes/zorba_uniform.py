"""`zorba-uniform`, a baseline: the same number of random blocks on every client."""

from zorba_server.modes.run_mode import RunMode
from zorba_server.scheduler_baselines import uniform_schedule

# Drawn anew each round, so every block is visited over the run.
MODE = RunMode("zorba-uniform", "the same number of random blocks on every client",
               uniform_schedule, redraws_each_round=True)
