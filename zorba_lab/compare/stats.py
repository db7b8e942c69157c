"""The pure statistics of a comparison between run modes: curves in, paired figures out.

No model, simulator or clock here (zorba_lab/compare/simulator.py fills the inputs; the tests fill
them by hand).

Where the modes are compared. Within one seed every mode ran the same rounds on the same
fleet, but a round costs each mode different virtual seconds and forward passes. The common
point on an axis (virtual time, or forward passes) is the smallest value at which any mode of
that seed ended, so that every mode has a model there. A mode's model at a point is the
last version it had published at or before it: the model only changes when a round closes,
so this previous-value ("step") interpolation is exactly what a user of that run would hold
at that moment; the forwards and seconds of a round still in progress have produced nothing
yet. Linear interpolation between versions would credit a mode with half a round it had not
finished.

Rounds are synchronous, so the modes' last rounds often close within milliseconds of each
other in virtual time (same speeds and steps, different message sizes: a mode with shorter
messages closes its rounds ~0.1 ms earlier). Taken literally, the mode that ends first would set
the point, and a mode ending a millisecond later would be scored at its previous version: a
whole round less for a negligible difference (seen in a 1-round run, and in session 15's
3-seed comparison, where ZorBA was sometimes scored one version back). So ends within
`SIMULTANEOUS` of the earliest count as the same moment: the time point is the earliest end
plus 10 virtual milliseconds, 100x the message-size differences and far below any round's
length (a simulated round lasts at least one step of a client: seconds). Forward passes are
counted exactly: no tolerance.

Paired differences: for each seed, mode A's accuracy minus mode B's at the same point (same
seed: same data split, held-out examples, fleet and noise). The 90% interval is a percentile
bootstrap of the mean difference over seeds (resampling seeds with replacement, seeded, so
the same figures give the same interval). With five seeds it is a rough interval: it cannot
be wider than the spread of the per-seed differences and says nothing about variation the
seeds did not show.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

TIME = "virtual_time_s"
FORWARDS = "forwards"
AXES = (TIME, FORWARDS)
"""The two axes modes are compared on (attribute names of `VersionPoint`)."""
SIMULTANEOUS = {TIME: 0.01, FORWARDS: 0.0}
"""How close two runs' ends on an axis must be to count as the same moment (module docstring)."""


@dataclass(frozen=True)
class VersionPoint:
    """One published model of a run: where on both axes it became available."""

    version: int
    round: int
    """The round that produced it (0: the base model)."""
    virtual_time_s: float
    forwards: int
    """Forward passes spent by every client up to its round's close."""
    accuracy: float | None = None
    """On the curve's held-out examples (None: not evaluated)."""


def check_curve(points: Sequence[VersionPoint]) -> None:
    if not points or points[0].version != 0:
        raise ValueError("a curve starts with the base model (version 0)")
    for before, after in zip(points, points[1:], strict=False):
        if after.version <= before.version or after.virtual_time_s < before.virtual_time_s \
                or after.forwards < before.forwards:
            raise ValueError(f"curve not in order at version {after.version}: versions must "
                             "increase and time and forwards must not decrease")


def version_at(points: Sequence[VersionPoint], axis: str, x: float) -> VersionPoint:
    """The last version published at or before `x` on `axis` (the base model at worst)."""
    check_curve(points)
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}: use one of {AXES}")
    chosen = points[0]
    for point in points:
        if getattr(point, axis) <= x:
            chosen = point
    return chosen


def common_point(ends: Sequence[float], axis: str) -> float:
    """The smallest value on `axis` at which the runs ended, plus the axis's `SIMULTANEOUS`
    tolerance: every run has a model there, and runs that ended together hold their last one.

    A run's end is where its last round closed (applied or not: an idle or failed round
    still spends virtual time, and a failed one forward passes)."""
    if not ends:
        raise ValueError("no runs to compare")
    if axis not in AXES:
        raise ValueError(f"unknown axis {axis!r}: use one of {AXES}")
    return min(ends) + SIMULTANEOUS[axis]


def accuracy_on_grid(points: Sequence[VersionPoint], axis: str,
                     grid: Sequence[float]) -> list[float]:
    """Curve accuracy at each grid value (the version held there, as `version_at`)."""
    out = []
    for x in grid:
        point = version_at([p for p in points if p.accuracy is not None], axis, x)
        assert point.accuracy is not None
        out.append(point.accuracy)
    return out


# ---------------------------------------------------------------------------- paired statistics


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    ci90: tuple[float, float]
    per_seed: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "ci90": list(self.ci90), "per_seed": list(self.per_seed)}


def bootstrap_ci(values: Sequence[float], *, level: float = 0.9, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    if len(values) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values, got {len(values)}: "
                         "run more seeds")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *, seed: int = 0,
                      resamples: int = 10_000) -> PairedDifference:
    """a - b over the seeds both have, with a bootstrap 90% interval of the mean."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return PairedDifference(statistics.fmean(diffs), bootstrap_ci(diffs, seed=seed,
                                                                  resamples=resamples),
                            tuple(diffs))


def gain_ratio(mode: Mapping[int, float], reference: Mapping[int, float],
               base: Mapping[int, float]) -> float | None:
    """(mean gain of `mode` over the base model) / (mean gain of `reference`), over the seeds
    all three have; None when the reference gained nothing (a ratio would mean nothing)."""
    seeds = sorted(set(mode) & set(reference) & set(base))
    if not seeds:
        return None
    gain = statistics.fmean(mode[s] - base[s] for s in seeds)
    ref_gain = statistics.fmean(reference[s] - base[s] for s in seeds)
    return gain / ref_gain if ref_gain > 0 else None
