"""`zorba`, the default: the scheduler fits each client's blocks to its memory budget."""

from zorba_server.modes.run_mode import RunMode
from zorba_server.scheduler import solve_schedule

MODE = RunMode("zorba", "the scheduler assigns each client the blocks its budget holds (default)",
               solve_schedule)
