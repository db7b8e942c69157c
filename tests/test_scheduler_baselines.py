"""The baselines' assignments: fedzo-full (every block or nothing) and zorba-uniform."""

from __future__ import annotations

from zorba_common.memory_model import LinearMemoryModel
from zorba_server.scheduler import ClientSpec, SchedulerConfig
from zorba_server.scheduler_baselines import fedavg_schedule, full_schedule, uniform_schedule

BLOCKS = (10, 10, 10, 10, 10, 10)
CONFIG = SchedulerConfig(milp_max_clients=0)


def client(cid: str, budget: int, fixed: int = 100, cost: int = 20, weight: float = 1.0) -> ClientSpec:
    return ClientSpec(cid, budget, LinearMemoryModel(fixed, (cost,) * len(BLOCKS)), weight)


def test_full_mode_trains_every_block_and_excludes_who_cannot_hold_them_all() -> None:
    clients = [client("big", 100 + 6 * 20), client("small", 100 + 5 * 20)]
    schedule = full_schedule(clients, BLOCKS, CONFIG)
    assert schedule.assignments == {"big": tuple(range(6))}
    assert "cannot hold every block" in schedule.excluded_clients["small"]
    assert schedule.memory_bytes["big"] <= clients[0].budget_bytes
    assert schedule.method == "full" and not schedule.uncovered_blocks


def test_uniform_mode_gives_everyone_the_tightest_clients_count_of_random_blocks() -> None:
    clients = [client("a", 100 + 2 * 20), client("b", 100 + 5 * 20), client("c", 100 + 6 * 20),
               client("frozen-only", 90)]
    first = uniform_schedule(clients, BLOCKS, CONFIG, round_seed=1)
    assert set(first.assignments) == {"a", "b", "c"}
    assert "cannot hold the frozen model" in first.excluded_clients["frozen-only"]
    assert {len(blocks) for blocks in first.assignments.values()} == {2}
    for c in clients[:3]:
        assert first.memory_bytes[c.client_id] <= c.budget_bytes
    again = uniform_schedule(clients, BLOCKS, CONFIG, round_seed=1)
    assert again.assignments == first.assignments  # seeded: a restarted server agrees
    draws = {uniform_schedule(clients, BLOCKS, CONFIG, round_seed=s).assignments["b"] for s in range(20)}
    assert len(draws) > 5  # the blocks really are drawn at random, round by round


def test_fedavg_mode_trains_every_block_on_every_client_whatever_its_budget() -> None:
    clients = [client("big", 100 + 6 * 20), client("tiny", 50)]
    schedule = fedavg_schedule(clients, BLOCKS, CONFIG)
    assert schedule.assignments == {"big": tuple(range(6)), "tiny": tuple(range(6))}
    assert not schedule.excluded_clients and schedule.method == "fedavg"
    # The plan records the budget it breaks, so reports can show it.
    assert schedule.memory_bytes["tiny"] > clients[1].budget_bytes
