"""One admission rule (issue 27): a device the client's own check admits is one the server
registers and the scheduler plans; one it refuses, both refuse, with the budget that would do.

Before, the client and the registration judged the whole budget and the scheduler 95% of it:
a client with a budget in between was admitted, registered, and left out of every round."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_fakes import engine, join
from server_fakes import FOOTPRINT, profile

from zorba_common.memory_model import MEMORY_HEADROOM
from zorba_edge.client.admission import admit
from zorba_edge.client.byte_sizes import parse_size
from zorba_edge.client.errors import BudgetError
from zorba_server.config import RunConfig
from zorba_server.errors import Unprocessable


def client_admits(e: object, budget: int) -> bool:
    run = e.config.run  # type: ignore[attr-defined]
    settings = profile().memory.settings(run.batch_size, run.seq_len, 1.0)
    try:
        admit(FOOTPRINT, settings, budget)
    except BudgetError:
        return False
    return True


def test_the_client_the_registration_and_the_scheduler_agree_at_every_budget(
        tmp_path: Path) -> None:
    assert RunConfig().memory_headroom == MEMORY_HEADROOM  # one default, held in one place
    probe = engine(tmp_path)
    need = probe.memory_model(profile(), 1.0).budget_needed()
    whole = probe.memory_model(profile(), 1.0)
    whole_budget = whole.fixed_bytes + min(whole.block_bytes)  # what the old rule admitted
    assert whole_budget < need
    for budget in (whole_budget, need - 1, need, need + 1, 2 * need):
        e = engine(tmp_path)
        client = client_admits(e, budget)
        try:
            join(e, "dev", budget=budget)
            registered = True
        except Unprocessable:
            registered = False
        scheduled = False
        if registered:
            plan = e.propose_round(now=0.0)
            scheduled = plan is not None and "dev" in plan.clients
        assert client == registered == scheduled == (budget >= need), (budget, need)


def test_a_refusal_names_the_memory_budget_that_would_be_admitted(tmp_path: Path) -> None:
    e = engine(tmp_path)
    need = e.memory_model(profile(), 1.0).budget_needed()
    with pytest.raises(Unprocessable, match="--memory-budget") as refused:
        join(e, "dev", budget=need - 1)
    named = parse_size(re.search(r"--memory-budget (\d+MiB)", refused.value.message).group(1))
    join(e, "dev", budget=named)  # what the refusal names is enough
    with pytest.raises(BudgetError, match="--memory-budget") as told:
        admit(FOOTPRINT, profile().memory.settings(e.config.run.batch_size, e.config.run.seq_len,
                                                  1.0), need - 1)
    assert parse_size(re.search(r"--memory-budget (\d+MiB)", str(told.value)).group(1)) == named


def test_a_client_left_out_later_is_told_to_raise_its_memory_budget(tmp_path: Path) -> None:
    """Registered, then its measured peaks calibrate its model above its budget: the reason it
    hears names the fix."""
    e = engine(tmp_path)
    need = e.memory_model(profile(), 1.0).budget_needed()
    member = join(e, "dev", budget=need)
    join(e, "big")
    member.calibration = 3.0
    plan = e.propose_round(now=0.0)
    assert plan is not None and "dev" in plan.excluded
    assert "--memory-budget" in plan.excluded["dev"]
