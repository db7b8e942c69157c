"""How a round ended: the statuses a round's record carries (dependency-free, so that
the step size's owner and the round records can both name them)."""

APPLIED, FAILED, REJECTED, OPEN = "applied", "failed", "rejected", "open"
"""`rejected`: enough reports, but the loss jumped; nothing applied and the step is halved."""
CHECKED = "checked"
"""A final check (zorba_server/final_check.py) found the final version sound: the run ends on
it; the round's own steps are not applied."""
