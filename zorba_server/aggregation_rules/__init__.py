"""Aggregation rules, one file each: how a round's per-client step sums become one value per
(pool index k, block b). `aggregation.method` names one of `RULES`; the config's check, the
`--aggregation` flag and docs/protocol.md's rule table all read their choices from it.

A new rule is a function `rule(scalars: RoundScalars, config: AggregationConfig) -> K x B array`
in a file of its own, an entry here, and its tests. Its docstring's first sentence is its
description in `zorba-server --help` and docs/protocol.md.
"""

from __future__ import annotations

from zorba_server.aggregation_rules.mean import mean
from zorba_server.aggregation_rules.median import median
from zorba_server.aggregation_rules.scalars import RoundScalars, Rule
from zorba_server.aggregation_rules.sum import weighted_sum
from zorba_server.aggregation_rules.trimmed_mean import trimmed_mean

RULES: dict[str, Rule] = {"mean": mean, "sum": weighted_sum, "trimmed_mean": trimmed_mean,
                          "median": median}
"""aggregation.method -> its rule, the default first."""
VOTING_RULES = ("trimmed_mean", "median")
"""Rules that vote, per direction, among the clients that measured it (the robust ones)."""


def rules_help() -> str:
    """Every rule and its description, as each command that takes --aggregation explains them."""
    return "; ".join(f"{name}: {describe(rule)}" for name, rule in RULES.items())


def describe(rule: Rule) -> str:
    """A rule's one-line description: its docstring's first paragraph, on one line."""
    doc = (rule.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split()).rstrip(".")


__all__ = ["RULES", "VOTING_RULES", "RoundScalars", "Rule", "describe", "rules_help"]
