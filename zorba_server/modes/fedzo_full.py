"""`fedzo-full`, a baseline (the FedKSeed/DeComFL family): zeroth-order on every block."""

from zorba_server.modes.run_mode import RunMode
from zorba_server.scheduler_baselines import full_schedule

MODE = RunMode("fedzo-full", "zeroth-order on every block; a client that cannot hold them all "
               "takes no part", full_schedule)
