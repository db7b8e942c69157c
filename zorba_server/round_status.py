"""How a round ended: the four statuses a round's record carries (dependency-free, so that
the step size's owner and the round records can both name them)."""

APPLIED, FAILED, REJECTED, OPEN = "applied", "failed", "rejected", "open"
"""`rejected`: enough reports, but the loss jumped; nothing applied and the step is halved."""
