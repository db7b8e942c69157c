"""A reported scalar is checked by one function under one name for its limit, on both sides."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from zorba_common.errors import InvalidScalarError
from zorba_common.scalars import check_scalar, check_scalars

ROOT = Path(__file__).resolve().parents[1]


def test_a_scalar_at_the_limit_passes_and_one_past_it_is_refused_naming_the_limit() -> None:
    assert check_scalar(-5.0, 5.0, "g") == -5.0
    with pytest.raises(InvalidScalarError, match=r"g = 5\.5 exceeds the run's limit \(max_abs_scalar 5\)"):
        check_scalar(5.5, 5.0, "g")


@pytest.mark.parametrize("g", [math.nan, math.inf, -math.inf])
def test_a_non_finite_scalar_is_refused_whatever_the_limit(g: float) -> None:
    with pytest.raises(InvalidScalarError, match="the loss diverged or overflowed"):
        check_scalar(g, math.inf, "g")


def test_a_report_names_its_first_bad_step_and_pool_index() -> None:
    check_scalars([(3, 1.0), (7, -2.0)], max_abs_scalar=2.0)
    with pytest.raises(InvalidScalarError, match="step 1: projected gradient at k=7 = -3 exceeds"):
        check_scalars([(3, 1.0), (7, -3.0), (9, math.nan)], max_abs_scalar=2.0)


def test_the_client_and_the_server_run_this_check() -> None:
    from zorba_edge.engine import zo
    from zorba_server import rounds

    assert zo.check_scalar is check_scalar and rounds.check_scalars is check_scalars


def test_the_limit_has_one_name() -> None:
    old = "max_abs_" + "grad"
    users = [p for folder in ("zorba_common", "zorba_edge", "zorba_server", "zorba_sim",
                              "zorba_lab", "zorba_flower", "benchmarks", "tests", "docs")
             for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".toml")
             and old in p.read_text(encoding="utf-8")]
    assert users == []
