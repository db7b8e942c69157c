"""The aggregation rules' registry: what it lists is what the config, the CLI and the docs offer,
and a rule registered there runs through a round's close without touching anything else."""

from __future__ import annotations

import numpy as np
import pytest

from zorba_common.messages import HyperParams, Report
from zorba_server.aggregation_rules import RULES, RoundScalars
from zorba_server.aggregation_rules.scalars import per_voter_set
from zorba_server.cli import parse_args
from zorba_server.config import AggregationConfig, ConfigError
from zorba_server.protocol_docs import aggregation_table
from zorba_server.rounds import APPLIED, ClientPlan, ReceivedReport, RoundPlan, decide_round

CANDIDATES = ("mean", "sum", "trimmed_mean", "median", "max", "mode", "krum", "Mean", "")


def accepted(name: str) -> bool:
    try:
        AggregationConfig(method=name)
    except ConfigError:
        return False
    return True


def test_the_config_accepts_exactly_the_registered_rules() -> None:
    assert list(RULES) == ["mean", "sum", "trimmed_mean", "median"]  # the default first
    assert {n for n in CANDIDATES if accepted(n)} == set(RULES)
    assert AggregationConfig().method in RULES
    with pytest.raises(ConfigError) as err:
        AggregationConfig(method="max")
    assert all(name in str(err.value) for name in RULES)


def test_the_cli_offers_exactly_the_registered_rules(capsys: pytest.CaptureFixture[str]) -> None:
    for name in RULES:
        assert parse_args(["--aggregation", name]).aggregation == name
    with pytest.raises(SystemExit):
        parse_args(["--aggregation", "max"])
    assert "invalid choice: 'max'" in capsys.readouterr().err


def largest(scalars: RoundScalars, config: AggregationConfig) -> np.ndarray:
    """The largest s[n, k] over the clients that hold b and took step k."""
    return per_voter_set(scalars, lambda values: float(values[-1]))


PLAN = RoundPlan(
    round=1, base_version=0, opened_at=0.0, deadline=10.0, hyper=HyperParams(0.1, 1e-3, 8, 64),
    pool_indices=(7, 3), clients={"a": ClientPlan((0,), 2), "b": ClientPlan((0, 1), 2),
                                  "c": ClientPlan((1,), 2)},
)


def received(cid: str, steps: list[tuple[int, float]]) -> ReceivedReport:
    return ReceivedReport(cid, Report("k", 0, tuple(steps), 8, 1.0, 1.0, 0, 0.1), b"", 1.0)


def test_a_rule_registered_in_one_file_runs_end_to_end_through_decide_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RULES, "largest", largest)
    config = AggregationConfig(method="largest")
    reports = {"a": received("a", [(7, 1.0), (3, -2.0)]),
               "b": received("b", [(7, 3.0), (3, -1.0)]),
               "c": received("c", [(7, -4.0)])}
    outcome = decide_round(PLAN, reports, dict.fromkeys(reports, 1.0), min_reports=1,
                           aggregation=config)
    assert outcome.status == APPLIED and outcome.delta is not None
    assert outcome.delta.pool_indices == (3, 7) and outcome.delta.blocks == (0, 1)
    expected = 0.1 * np.array([[-1.0, -1.0],   # k=3: block 0 {a, b}, block 1 {b} (c skipped it)
                               [3.0, 3.0]])    # k=7: block 0 {a, b}, block 1 {b, c}
    np.testing.assert_allclose(outcome.delta.values, expected, rtol=1e-6)
    # The CLI and the docs list it too, read from the same registry.
    assert parse_args(["--aggregation", "largest"]).aggregation == "largest"
    assert "| `largest` | The largest s[n, k] over the clients" in aggregation_table()
    monkeypatch.undo()
    assert not accepted("largest") and "largest" not in aggregation_table()
