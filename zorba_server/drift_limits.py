"""What the drift bound did to a round's blocks, and how its messages say so (pure; apart from
drift.py so that drift_budget.py, which the config imports, needs nothing of aggregation's)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limited:
    """What the bound did to one block's increments this round."""

    scale: float
    """The share of the round's step the block took (its rows projected onto the bound, when
    the step alone was past it: the share before that)."""
    shrunk: int = 0
    """Older coefficients shrunk to make room for it (0: the step was only scaled)."""


def describe_blocks(limited: dict[int, Limited]) -> str:
    """"scaled this round's increments on block(s) ...": what both bounds' messages say of
    the blocks they limited."""
    def one(b: int, how: Limited) -> str:
        return f"{b} x{how.scale:.2f}" + (f" (-{how.shrunk} older)" if how.shrunk else "")

    shown = ", ".join(one(b, how) for b, how in sorted(limited.items())[:6])
    more = f" and {len(limited) - 6} more" if len(limited) > 6 else ""
    room = ("; a block at the bound makes room by shrinking its largest older coefficients"
            if any(how.shrunk for how in limited.values()) else "")
    return f"scaled this round's increments on block(s) {shown}{more}{room}"
