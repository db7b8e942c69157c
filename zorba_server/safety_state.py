"""What the run's safety rules remember from round to round, as one durable record (pure).

The loss guard's anchor (its version and each client's check loss there), the fluency watch's
references, its last fluent version and last verdict, the plateau count and the training-loss
references: a server that kept them in memory alone judged its first rounds after a restart
against nothing (the guard re-anchored on whatever the clients measured next; the watch took
each client's first value after the restart, perhaps of a model already broken, for its base),
so a restart could change the run's decisions (issue 26, item 5). The durable shell stores
this record with every round's close, in the same transaction, and a restarted engine takes
it back (`RoundEngine.restore_safety`).

The tables of the anchor and of the last fluent version are not stored: each is the run's table
at its version, the sum of the stored increments up to it (storage/integrity.py checks that the
current table is exactly that sum). The record names those versions (`tables`), and the store
replays the increments to them when it loads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zorba_common.messages import AlphaDelta
from zorba_server.fluency_watch import FluencyVerdict, Fluent, Reference
from zorba_server.loss_guard import Anchor, Plateau


@dataclass(frozen=True)
class SafetyState:
    anchor: Anchor | None = None
    fluent: Fluent | None = None
    references: Mapping[str, Reference] = field(default_factory=dict)
    plateau: Plateau = field(default_factory=Plateau)
    reference_losses: Mapping[str, float] = field(default_factory=dict)
    last_fluency: FluencyVerdict | None = None

    def to_record(self) -> dict[str, Any]:
        """A msgpack-ready map; `tables` lists the versions whose tables `from_record` needs."""
        verdict = self.last_fluency
        return {
            "anchor": None if self.anchor is None else [self.anchor.version,
                                                        dict(self.anchor.losses)],
            "fluent": None if self.fluent is None else self.fluent.version,
            "references": {cid: [r.loss, r.base] for cid, r in self.references.items()},
            "plateau": [self.plateau.stale_rounds, self.plateau.step_decays],
            "reference_losses": dict(self.reference_losses),
            "last_fluency": None if verdict is None else [
                verdict.version, verdict.broken, verdict.reference, verdict.now,
                verdict.breaking, verdict.judged],
            "tables": sorted({v.version for v in (self.anchor, self.fluent) if v is not None}),
        }

    @staticmethod
    def from_record(rec: Mapping[str, Any], tables: Mapping[int, np.ndarray]) -> SafetyState:
        """The state `to_record` wrote, with `tables` (version -> the run's table then)."""
        anchor = None
        if rec["anchor"] is not None:
            version, losses = rec["anchor"]
            anchor = Anchor(int(version), tables[int(version)].copy(),
                            {str(c): float(v) for c, v in losses.items()})
        fluent = None if rec["fluent"] is None else Fluent(int(rec["fluent"]),
                                                           tables[int(rec["fluent"])].copy())
        verdict = rec["last_fluency"]
        return SafetyState(
            anchor, fluent,
            {str(c): Reference(float(loss), bool(base)) for c, (loss, base) in rec["references"].items()},
            Plateau(int(rec["plateau"][0]), int(rec["plateau"][1])),
            {str(c): float(v) for c, v in rec["reference_losses"].items()},
            None if verdict is None else FluencyVerdict(
                int(verdict[0]), bool(verdict[1]), float(verdict[2]), float(verdict[3]),
                int(verdict[4]), int(verdict[5])))


def tables_at(deltas: Iterable[AlphaDelta], shape: tuple[int, ...],
              versions: Sequence[int]) -> dict[int, np.ndarray]:
    """The run's table at each of `versions`, from its published `deltas` (in version order,
    from version 1): replayed from zeros as the server applied them (`aggregation.apply_delta`;
    storage/integrity.py checks that a stored table is exactly that sum)."""
    wanted = set(versions)
    table = np.zeros(shape)
    out = {0: table.copy()} if 0 in wanted else {}
    last = max(wanted, default=0)
    for delta in deltas:
        if delta.version > last:
            break
        delta.add_to_(table)
        if delta.version in wanted:
            out[delta.version] = table.copy()
    return out
