"""Malicious virtual clients: what a client sends instead of its honest report.

A simulation holds `adversaries: {client_id: Adversary}`. For such a client the simulator
runs its honest local steps as usual (so its forward passes, batches and random stream are
those of an honest client), then hands the honest `Report` to the adversary and gives the
engine whatever comes back: the engine's `check_report` / `accept_report` and the round's
aggregation see exactly what a real server would receive from that client. A report the
engine refuses (a scalar above the run's `max_abs_scalar`, say) is dropped, as a real
server's 422 would drop it, and the adversary counts it in `refused`.

Nothing here is known to the server or the SDK: attacks live only in the simulator.

    sim = Simulation.build(...)
    sim.adversaries = {"v000000": ScaleScalars(100.0)}

The scalar attacks change only the projected-gradient scalars (what aggregation turns into
alpha); the reported losses, sample counts and timings stay honest, so the loss guard judges
the attacker's rounds as it would an honest client's. `GuardVeto` does the opposite: honest
scalars, implausible check losses (an attack on the loss guard itself).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field

from zorba_common.messages import Report
from zorba_server.config import AggregationConfig
from zorba_server.rounds import RoundPlan


@dataclass
class Adversary:
    """Identity: sends the honest report (the base of every attack, and the control)."""

    sent: int = 0
    """Reports handed to the engine."""
    refused: list[tuple[int, str]] = field(default_factory=list)
    """(round, the engine's message) for every report the engine refused."""
    max_abs_sent: float = 0.0
    """The largest |g| this client sent (to compare with the run's max_abs_scalar)."""

    def scalar(self, g: float) -> float:
        return g

    def transform(self, report: Report) -> Report:
        steps = tuple((k, self.scalar(g)) for k, g in report.steps)
        self.sent += 1
        self.max_abs_sent = max([self.max_abs_sent, *(abs(g) for _, g in steps)])
        return dataclasses.replace(report, steps=steps)


@dataclass
class ScaleScalars(Adversary):
    """Every projected gradient times `factor` (the model-replacement / boosting attack)."""

    factor: float = 100.0

    def scalar(self, g: float) -> float:
        return self.factor * g


@dataclass
class FlipSigns(Adversary):
    """Every projected gradient negated, times `factor` (gradient ascent on its data)."""

    factor: float = 1.0

    def scalar(self, g: float) -> float:
        return -self.factor * g


@dataclass
class GuardVeto(Adversary):
    """Honest scalars; a check loss of 0.0 in its first report and `high` in every later one
    (both inside the wire's bounds): the attack on the loss guard of issue 27, which, judged on
    a weighted mean, rolled back 7 of 8 rounds of a run of four."""

    high: float = 1e6

    def transform(self, report: Report) -> Report:
        sent = super().transform(report)
        return dataclasses.replace(sent, loss_check=0.0 if self.sent == 1 else self.high)


ATTACKS: dict[str, type[Adversary]] = {"identity": Adversary, "scale": ScaleScalars,
                                       "sign-flip": FlipSigns, "guard-veto": GuardVeto}
"""Attack name (as benchmarks/poisoning.py takes it) -> class."""


@dataclass(frozen=True)
class Exposure:
    """How one round's plan lets a rule outvote one attacker (before anyone reports).

    Every client of a round gets a prefix of the same pool indices, so the voters on a pair
    (k, b) are the clients that hold block b and take step k: redundancy comes only from
    several clients holding the same block. One attacker among n voters is outvoted by the
    median when n >= 3 (with two, the median is their mean), and by a trimmed mean with
    fraction f only when floor(f n) >= 1, i.e. n >= 1/f (10 voters at the default 0.1).
    The mean never outvotes it: it only dilutes it by its share of the sample weight.
    """

    attacker_blocks: int
    """Blocks the attacker holds this round."""
    voters_min: int
    voters_max: int
    """Fewest and most voters (holders, the attacker included) on the attacker's blocks."""
    outvoted_blocks: int
    """Of the attacker's blocks, those on which the rule keeps its value out."""


def exposure(plan: RoundPlan, attacker: str, aggregation: AggregationConfig) -> Exposure:
    """The attacker's blocks in `plan` and how many of them `aggregation` protects (planned
    holders on the first step, which every client that reports takes)."""
    holders = Counter(b for p in plan.clients.values() for b in p.blocks)
    mine = plan.clients[attacker].blocks if attacker in plan.clients else ()
    voters = [holders[b] for b in mine]
    return Exposure(len(mine), min(voters, default=0), max(voters, default=0),
                    sum(outvotes(n, aggregation) for n in voters))


def outvotes(voters: int, aggregation: AggregationConfig) -> bool:
    """Whether `aggregation` keeps one extreme value among `voters` out of its result."""
    if aggregation.method == "median":
        return voters >= 3
    if aggregation.method == "trimmed_mean":
        return math.floor(aggregation.trim_fraction * voters) >= 1
    return False
