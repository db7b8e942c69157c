"""`fedavg`, a baseline: first-order AdamW on every block, weights exchanged both ways."""

from zorba_server.modes.run_mode import RunMode
from zorba_server.scheduler_baselines import fedavg_schedule

# It runs whatever the budget: its measured peaks are the finding (which budgets it breaks).
MODE = RunMode("fedavg", "first-order AdamW on every block, weights both ways, budgets not kept",
               fedavg_schedule, weights_only=True, enforces_budget=False)
