"""The fluency watch on the real server: do the clients' generic-text losses say the model
still generates? (pure)

Every client that the round asks (`Assignment.measure_generic`) measures, beside its check
loss, the next-token loss of the model it received on the generic text every client package
carries (zorba_edge/engine/fluency.py) and reports it (`Report.loss_generic`). Each client is
judged against its own reference: its loss on the base model (the round it measured at version
0), or, for a client that joined later, the median of the other clients' base values (its own
first value when nobody measured the base: after a restart, or a watch turned on mid-run). A
client's frozen blocks are held quantised, so its own base value, not the simulator's fp32 one,
is what its later values compare with. The rule is the simulator's (zorba_common.fluency:
more than run.fluency_tolerance above the base is broken); a majority of the judged clients, by
count and by sample weight (loss_guard.majority), must call it broken, so no minority rolls a
run back. The engine then rolls the table back to the last version the watch found fluent
(round_close.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from zorba_common.fluency import broken
from zorba_server.loss_guard import majority


@dataclass(frozen=True)
class Reference:
    loss: float
    base: bool
    """Measured on the base model (version 0) by this client itself."""


@dataclass(frozen=True)
class FluencyVerdict:
    """What the watch made of one round's generic-text losses."""

    version: int
    """The version they measured (the round's base version)."""
    broken: bool
    """A majority of the judged clients, by count and weight, saw it more than the tolerance
    above their reference."""
    reference: float
    now: float
    """The judged clients' weighted mean reference and loss now."""
    breaking: int
    judged: int


@dataclass(frozen=True)
class Fluent:
    """The last version the watch found fluent, with its table: what it rolls back to."""

    version: int
    alpha: np.ndarray


def remember(references: Mapping[str, Reference], version: int,
             losses: Mapping[str, float]) -> dict[str, Reference]:
    """The references after a round whose clients measured `losses` at `version`."""
    out = dict(references)
    if version == 0:
        out.update({cid: Reference(loss, True) for cid, loss in losses.items()})
        return out
    bases = [r.loss for r in out.values() if r.base]
    for cid, loss in losses.items():
        if cid not in out:
            out[cid] = Reference(statistics.median(bases) if bases else loss, False)
    return out


def judge(references: Mapping[str, Reference], version: int, losses: Mapping[str, float],
          weights: Mapping[str, float], tolerance: float) -> FluencyVerdict | None:
    """The verdict on the model at `version` (None: nobody to judge, or the watch is off)."""
    judged = [(weights[cid], references[cid].loss, loss) for cid, loss in sorted(losses.items())
              if cid in references and weights.get(cid, 0.0) > 0]
    if tolerance <= 0 or not judged:
        return None
    flags = [(w, broken(ref, loss, tolerance)) for w, ref, loss in judged]
    total = sum(w for w, _, _ in judged)
    return FluencyVerdict(
        version, majority(flags), sum(w * ref for w, ref, _ in judged) / total,
        sum(w * loss for w, _, loss in judged) / total, sum(f for _, f in flags), len(judged))


def message(verdict: FluencyVerdict, tolerance: float, fluent_version: int) -> str:
    """Why the round is rolled back, for the round's record, the log and the status page."""
    return (f"the fluency watch: generation broke: the clients' generic-text loss rose from "
            f"{verdict.reference:.4g} (base) to {verdict.now:.4g} (version {verdict.version}), "
            f"more than {tolerance:.0%} above in {verdict.breaking} of {verdict.judged} clients: "
            f"this round is not applied and the table is rolled back to version "
            f"{fluent_version}'s, the last the watch found fluent")
