"""Memory calibration: each member's measured peak over the memory model's prediction (pure).

The scheduler plans with the memory model times the member's calibration. A round's reports
carry measured peaks; closing the round turns them into new calibrations, and members left
out of it drift back toward the model (docs/protocol.md states the rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from zorba_server.config import RunConfig
from zorba_server.members import Member, memory_model
from zorba_server.rounds import ReceivedReport, RoundPlan

# Calibration learned from measured peaks: an EMA of peak / predicted, kept in a band so
# one odd measurement cannot make a client look free or unusable.
CALIBRATION_MIN, CALIBRATION_MAX, CALIBRATION_EMA = 0.5, 8.0, 0.5
# Re-solve the schedule when a calibration moves by more than this factor.
CALIBRATION_STEP = 1.1
# A member left out of a round has its calibration above 1 halved toward 1 (the memory
# model), so one that calibration excluded comes back with its cheapest block and measures
# again (an under-estimate is corrected at once); without it such a client was excluded for
# good, since only a round it trains can lower its calibration.
CALIBRATION_DECAY = 0.5


def band(calibration: float) -> int:
    """The re-solve band a calibration falls in: the schedule is re-solved when it changes."""
    return round(math.log(calibration, CALIBRATION_STEP))


def measured(run: RunConfig, members: Mapping[str, Member], plan: RoundPlan,
             received: Mapping[str, ReceivedReport]) -> dict[str, float]:
    """New calibrations of the members whose reports measured a peak."""
    out = {}
    for cid, rec in received.items():
        peak = rec.report.peak_memory_bytes
        member = members.get(cid)
        if peak <= 0 or member is None:
            continue
        predicted = memory_model(run, member.profile, 1.0).total(plan.clients[cid].blocks)
        ratio = peak / predicted
        # An under-estimate is corrected at once (the next plan must fit); an
        # over-estimate only decays, so one lucky round cannot over-fill a device.
        value = max(ratio, (1 - CALIBRATION_EMA) * member.calibration + CALIBRATION_EMA * ratio)
        out[cid] = min(max(value, CALIBRATION_MIN), CALIBRATION_MAX)
    return out


def decayed(members: Mapping[str, Member], plan: RoundPlan) -> dict[str, float]:
    """Members without a part in this round: calibrations above 1 move halfway to 1 (and
    to 1 itself once within one re-solve band of it)."""
    out = {}
    for cid, m in sorted(members.items()):
        if cid not in plan.clients and m.calibration > 1.0:
            value = 1.0 + (m.calibration - 1.0) * CALIBRATION_DECAY
            out[cid] = value if value >= CALIBRATION_STEP else 1.0
    return out
