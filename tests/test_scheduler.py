"""The block-activation scheduler: optimal where it claims to be, feasible always, and
explicit about what it could not do."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest

from zorba_common.errors import AssignmentError
from zorba_common.memory_model import (
    LinearMemoryModel,
    MemorySettings,
    ModelFootprint,
    client_memory_bytes,
    linear_memory_model,
)
from zorba_server.scheduler import (
    ClientSpec,
    Schedule,
    SchedulerConfig,
    coverage_upper_bound,
    local_steps,
    solve_schedule,
)

HEURISTIC = SchedulerConfig(milp_max_clients=0)


def client(
    cid: str, budget: int, fixed: int, costs: tuple[int, ...], weight: float = 1.0, **kw
) -> ClientSpec:
    return ClientSpec(cid, budget, LinearMemoryModel(fixed, costs), weight, **kw)


def random_clients(rng: np.random.Generator, n: int, blocks: int) -> list[ClientSpec]:
    """Clients that each fit between one and all blocks, with uneven block costs."""
    out = []
    for i in range(n):
        fixed = int(rng.integers(50, 150))
        costs = tuple(int(c) for c in rng.integers(10, 40, blocks))
        budget = fixed + int(rng.integers(min(costs), sum(costs) + 10))
        out.append(client(f"c{i}", budget, fixed, costs, float(rng.integers(1, 20))))
    return out


def check_feasible(
    schedule: Schedule, clients: list[ClientSpec], block_params: list[int], config: SchedulerConfig
) -> None:
    """Every hard constraint the scheduler promises, checked from the public result only."""
    by_id = {c.client_id: c for c in clients}
    assert set(schedule.assignments) | set(schedule.excluded_clients) == set(by_id)
    assert not set(schedule.assignments) & set(schedule.excluded_clients)
    cap = config.max_perturbed_params or math.inf
    held = np.zeros(len(block_params), dtype=int)
    cov = np.zeros(len(block_params))
    for cid, blocks in schedule.assignments.items():
        c = by_id[cid]
        assert blocks, f"{cid} was admitted but given no block"
        assert c.memory.total(blocks) <= c.budget_bytes
        assert schedule.memory_bytes[cid] == c.memory.total(blocks)
        assert schedule.perturbed_params[cid] == sum(block_params[b] for b in blocks) <= cap
        held[list(blocks)] += 1
        cov[list(blocks)] += c.weight
    for b in schedule.required_blocks:
        assert held[b] >= 1
        assert cov[b] >= (1 - config.epsilon) * schedule.stage1_coverage - 1e-9
    for b in range(len(block_params)):
        assert (held[b] >= config.min_cover) == (b not in schedule.uncovered_blocks)
    assert np.allclose(cov, schedule.block_coverage)
    if schedule.required_blocks:
        assert schedule.coverage == pytest.approx(cov[list(schedule.required_blocks)].min())


# --- brute force -----------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What enumerating every assignment says about one instance."""

    best_cover_score: float
    """Most blocks brought to their client count (+ 0.5/B per block idle last round)."""
    cover_score: float
    """The same score for the `required` set that was asked about."""
    t_star: float
    """Stage 1 with `required` held to counts: the best least coverage."""
    least_objective: float
    """Stage 2: least perturbed parameters (less the stability bonus)."""


def brute_force(
    clients: list[ClientSpec], block_params: list[int], config: SchedulerConfig, required: set[int]
) -> Reference:
    """Enumerate all 2^(N*B) assignments of the clients that can train at least one block."""
    cap = config.max_perturbed_params or math.inf
    admitted = [
        c
        for c in clients
        if c.weight > 0
        and any(
            c.memory.fixed_bytes + cost <= c.budget_bytes and p <= cap
            for cost, p in zip(c.memory.block_bytes, block_params, strict=True)
        )
    ]
    n, nb = len(admitted), len(block_params)
    bits = (np.arange(2 ** (n * nb))[:, None] >> np.arange(n * nb)) & 1
    a = bits.reshape(-1, n, nb).astype(bool)
    cost = np.array([c.memory.block_bytes for c in admitted], dtype=float).reshape(n, nb)
    room = np.array([c.budget_bytes - c.memory.fixed_bytes for c in admitted], dtype=float)
    params = np.array(block_params, dtype=float)
    w = np.array([c.weight for c in admitted])
    prev = np.zeros((n, nb), dtype=bool)
    for i, c in enumerate(admitted):
        prev[i, list(c.previous)] = True
    idle_last_round = np.ones(nb, dtype=bool)
    for c in clients:
        idle_last_round[list(c.previous)] = False

    fits = ((a * cost).sum(axis=2) <= room).all(axis=1) & ((a @ params) <= cap).all(axis=1)
    holders = ((cost <= room[:, None]) & (params <= cap)[None, :]).sum(axis=0)
    target = np.minimum(holders, config.min_cover)
    at_count = (a.sum(axis=1) >= target[None, :]) & (target > 0)[None, :]

    def score(covered: np.ndarray) -> np.ndarray:
        return covered.sum(axis=-1) + 0.5 / nb * (covered & idle_last_round).sum(axis=-1)

    mask = np.isin(np.arange(nb), sorted(required))
    meets = fits & (at_count | ~mask[None, :]).all(axis=1)
    cov = np.einsum("n,mnb->mb", w, a)
    t = np.where(mask[None, :], cov, np.inf).min(axis=1) if mask.any() else 0.0 * cov[:, 0]
    t_star = float(t[meets].max()) if meets.any() else math.nan
    busy = a.any(axis=2).all(axis=1)
    ok = meets & busy & (t >= (1 - config.epsilon) * t_star - 1e-9)
    objective = (a * (params[None, :] * (1 - config.stability_bonus * prev))).sum(axis=(1, 2))
    return Reference(
        best_cover_score=float(score(at_count[fits]).max()),
        cover_score=float(score(mask)),
        t_star=t_star,
        least_objective=float(objective[ok].min()) if ok.any() else math.nan,
    )


def stage2_objective(schedule: Schedule, clients: list[ClientSpec], block_params, config) -> float:
    total = 0.0
    for c in clients:
        for b in schedule.assignments.get(c.client_id, ()):
            total += block_params[b] * (1 - config.stability_bonus * (b in c.previous))
    return total


SMALL = [
    (n, nb, seed) for n, nb in [(1, 3), (2, 2), (2, 4), (3, 3), (4, 4), (4, 3)] for seed in range(4)
]


def small_instance(
    n: int, nb: int, seed: int
) -> tuple[list[ClientSpec], list[int], SchedulerConfig]:
    rng = np.random.default_rng(100 * n + 10 * nb + seed)
    clients = [
        replace(c, previous=frozenset(int(b) for b in np.flatnonzero(rng.random(nb) < 0.4)))
        for c in random_clients(rng, n, nb)
    ]
    block_params = [int(p) for p in rng.integers(1, 5, nb) * 1000]
    config = SchedulerConfig(
        min_cover=int(rng.integers(1, 3)),
        epsilon=float(rng.choice([0.0, 0.1, 0.3])),
        max_perturbed_params=int(rng.choice([1, 2, 100])) * max(block_params),
        stability_bonus=0.2,
    )
    return clients, block_params, config


@pytest.mark.parametrize(("n", "nb", "seed"), SMALL)
def test_milp_is_lexicographically_optimal_against_brute_force(n: int, nb: int, seed: int) -> None:
    clients, block_params, config = small_instance(n, nb, seed)
    schedule = solve_schedule(clients, block_params, config)
    check_feasible(schedule, clients, block_params, config)
    ref = brute_force(clients, block_params, config, set(schedule.required_blocks))
    assert schedule.method == "milp" and schedule.optimal
    assert ref.cover_score == pytest.approx(ref.best_cover_score)
    assert schedule.stage1_coverage == pytest.approx(ref.t_star)
    assert schedule.stage1_bound == pytest.approx(ref.t_star)
    assert stage2_objective(schedule, clients, block_params, config) == pytest.approx(
        ref.least_objective
    )


def test_brute_force_draws_cover_both_regimes() -> None:
    """Guards the test above: some draws can bring every block to its count, some cannot."""
    short = 0
    for n, nb, seed in SMALL:
        clients, block_params, config = small_instance(n, nb, seed)
        schedule = solve_schedule(clients, block_params, config)
        short += any("federation" in why for why in schedule.uncovered_blocks.values())
    assert 0 < short < len(SMALL) // 2


# --- feasibility and what cannot be done ------------------------------------------------


@pytest.mark.parametrize("config", [SchedulerConfig(), HEURISTIC], ids=["milp", "heuristic"])
@pytest.mark.parametrize("seed", range(3))
def test_every_budget_cap_and_count_is_respected(config: SchedulerConfig, seed: int) -> None:
    rng = np.random.default_rng(seed)
    clients = random_clients(rng, 12, 6)
    config = replace(config, min_cover=2, max_perturbed_params=9000, time_limit_s=2.0)
    schedule = solve_schedule(clients, [1000, 2000, 3000, 1000, 2000, 3000], config)
    check_feasible(schedule, clients, [1000, 2000, 3000, 1000, 2000, 3000], config)


def test_heuristic_result_is_feasible_on_a_large_uneven_federation() -> None:
    rng = np.random.default_rng(7)
    clients = random_clients(rng, 400, 8)
    config = replace(HEURISTIC, min_cover=3, epsilon=0.2, max_perturbed_params=5)
    schedule = solve_schedule(clients, [1, 2, 1, 2, 1, 2, 1, 2], config)
    assert schedule.method == "heuristic"
    check_feasible(schedule, clients, [1, 2, 1, 2, 1, 2, 1, 2], config)
    assert not schedule.uncovered_blocks


def test_block_nobody_can_hold_is_named_and_the_rest_still_covered() -> None:
    clients = [client(f"c{i}", 200, 100, (30, 30, 500), float(i + 1)) for i in range(3)]
    schedule = solve_schedule(clients, [10, 10, 10], SchedulerConfig())
    assert set(schedule.uncovered_blocks) == {2}
    assert "no admitted client can hold it" in schedule.uncovered_blocks[2]
    assert schedule.required_blocks == (0, 1)
    assert schedule.coverage > 0


def test_block_over_the_perturbed_parameter_cap_is_named() -> None:
    clients = [client(f"c{i}", 1000, 100, (30, 30)) for i in range(2)]
    schedule = solve_schedule(clients, [10, 50], SchedulerConfig(max_perturbed_params=20))
    assert "max_perturbed_params" in schedule.uncovered_blocks[1]
    assert all(blocks == (0,) for blocks in schedule.assignments.values())


def test_client_that_cannot_hold_the_frozen_model_is_excluded_with_the_reason() -> None:
    clients = [client("big", 1000, 100, (30, 30)), client("tiny", 90, 100, (30, 30))]
    schedule = solve_schedule(clients, [10, 10], SchedulerConfig())
    assert set(schedule.assignments) == {"big"}
    assert "cannot hold the frozen model" in schedule.excluded_clients["tiny"]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (client("x", 110, 100, (30, 30)), "cheapest block needs"),
        (client("x", 1000, 100, (30, 30), weight=0.0), "no training samples"),
        (client("x", 1000, 100, (30, 30), step_time_s=20.0), "round deadline"),
    ],
)
def test_client_that_cannot_train_is_excluded_with_the_reason(spec: ClientSpec, why: str) -> None:
    others = [client("ok", 1000, 100, (30, 30), step_time_s=1.0)]
    schedule = solve_schedule(others + [spec], [10, 10], SchedulerConfig(round_deadline_s=10.0))
    assert why in schedule.excluded_clients["x"]
    assert set(schedule.assignments) == {"ok"}


def test_no_admitted_client_leaves_every_block_named() -> None:
    schedule = solve_schedule([client("tiny", 10, 100, (30, 30))], [10, 10], SchedulerConfig())
    assert schedule.assignments == {}
    assert set(schedule.uncovered_blocks) == {0, 1}
    assert "no client was admitted" in schedule.uncovered_blocks[0]


def test_block_fewer_than_min_cover_can_hold_gets_all_of_them_and_is_named() -> None:
    clients = [client("a", 1000, 100, (30, 30)), client("b", 150, 100, (30, 300))]
    schedule = solve_schedule(clients, [10, 10], SchedulerConfig(min_cover=2, epsilon=0.9))
    assert 1 in schedule.assignments["a"]
    assert "only 1 admitted client" in schedule.uncovered_blocks[1]
    assert 0 not in schedule.uncovered_blocks


@pytest.mark.parametrize("config", [SchedulerConfig(), HEURISTIC], ids=["milp", "heuristic"])
def test_short_capacity_covers_most_blocks_and_rotates_the_rest(config: SchedulerConfig) -> None:
    # Two clients fit one block each; four blocks: two must wait, and take their turn next.
    clients = [client(f"c{i}", 140, 100, (30,) * 4) for i in range(2)]
    first = solve_schedule(clients, [10] * 4, config)
    idle = set(first.uncovered_blocks)
    assert len(idle) == 2
    assert all("covered first next round" in why for why in first.uncovered_blocks.values())
    again = [replace(c, previous=frozenset(first.assignments[c.client_id])) for c in clients]
    second = solve_schedule(again, [10] * 4, config)
    assert set(second.uncovered_blocks) == {0, 1, 2, 3} - idle


# --- the two stages ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [SchedulerConfig(), HEURISTIC], ids=["milp", "heuristic"])
def test_epsilon_zero_keeps_the_stage1_optimum(config: SchedulerConfig) -> None:
    clients = random_clients(np.random.default_rng(3), 10, 5)
    schedule = solve_schedule(clients, [5] * 5, replace(config, epsilon=0.0, time_limit_s=3.0))
    assert schedule.coverage == pytest.approx(schedule.stage1_coverage, rel=1e-12)


@pytest.mark.parametrize("config", [SchedulerConfig(), HEURISTIC], ids=["milp", "heuristic"])
def test_larger_epsilon_trades_coverage_for_fewer_perturbed_params(config: SchedulerConfig) -> None:
    clients = [client(f"c{i}", 1000, 100, (30,) * 4, float(i % 3 + 1)) for i in range(8)]
    tight = solve_schedule(clients, [10] * 4, replace(config, epsilon=0.0))
    loose = solve_schedule(clients, [10] * 4, replace(config, epsilon=0.5))
    assert sum(loose.perturbed_params.values()) < sum(tight.perturbed_params.values())
    assert loose.coverage >= 0.5 * loose.stage1_coverage - 1e-9
    assert loose.stage1_coverage == pytest.approx(tight.stage1_coverage)


@pytest.mark.parametrize("config", [SchedulerConfig(), HEURISTIC], ids=["milp", "heuristic"])
def test_every_admitted_client_trains_at_least_one_block(config: SchedulerConfig) -> None:
    # One heavy client alone reaches the floor; stage 2 would otherwise idle the others.
    clients = [client("heavy", 1000, 100, (30,) * 3, 100.0)] + [
        client(f"light{i}", 1000, 100, (30,) * 3, 1.0) for i in range(4)
    ]
    schedule = solve_schedule(clients, [10] * 3, replace(config, epsilon=0.5))
    assert all(len(blocks) >= 1 for blocks in schedule.assignments.values())
    assert all(len(schedule.assignments[f"light{i}"]) == 1 for i in range(4))


@pytest.mark.parametrize("config", [SchedulerConfig(), HEURISTIC], ids=["milp", "heuristic"])
def test_ties_keep_last_rounds_assignment(config: SchedulerConfig) -> None:
    clients = [client(f"c{i}", 140, 100, (30,) * 3) for i in range(3)]
    first = solve_schedule(clients, [10] * 3, config)
    # Any rotation of the clients over the blocks is as good; pin one unlike the first.
    rotated = {f"c{i}": frozenset({(first.assignments[f"c{i}"][0] + 1) % 3}) for i in range(3)}
    again = [replace(c, previous=rotated[c.client_id]) for c in clients]
    second = solve_schedule(again, [10] * 3, config)
    assert {cid: frozenset(b) for cid, b in second.assignments.items()} == rotated


def test_milp_path_is_never_worse_than_the_heuristic() -> None:
    clients = random_clients(np.random.default_rng(11), 14, 6)
    config = SchedulerConfig(min_cover=2, time_limit_s=1.0)
    exact = solve_schedule(clients, [1] * 6, config)
    greedy = solve_schedule(clients, [1] * 6, replace(config, milp_max_clients=0))
    assert exact.stage1_coverage >= greedy.stage1_coverage
    if exact.stage1_coverage == greedy.stage1_coverage:
        assert sum(exact.perturbed_params.values()) <= sum(greedy.perturbed_params.values())


def test_heuristic_exchanges_clients_to_raise_the_least_covered_block() -> None:
    # Every client is full, so no single move helps; trading a 20 for a 15 does (t* 39).
    weights, fit = [15, 19, 20, 15, 17], [1, 2, 2, 1, 1]
    clients = [
        client(f"c{i}", 100 + 30 * k, 100, (30,) * 3, float(w))
        for i, (w, k) in enumerate(zip(weights, fit, strict=True))
    ]
    greedy = solve_schedule(clients, [1] * 3, HEURISTIC)
    ref = brute_force(clients, [1] * 3, SchedulerConfig(), {0, 1, 2})
    assert greedy.stage1_coverage == ref.t_star == 39.0


def test_heuristic_swaps_a_client_onto_a_block_only_it_can_hold() -> None:
    # The heavy pair could each take block 0 or 1 first; only they can hold block 2.
    clients = [client(f"pair{i}", 130, 100, (30, 30, 30), 10.0) for i in range(2)] + [
        client(f"small{i}", 160, 100, (30, 30, 500), 1.0) for i in range(4)
    ]
    schedule = solve_schedule(clients, [1] * 3, HEURISTIC)
    assert not schedule.uncovered_blocks
    assert schedule.required_blocks == (0, 1, 2)


def test_milp_finds_the_optimum_where_the_greedy_falls_short() -> None:
    # A partition-like instance (3 blocks, clients fit 1 or 2) that the greedy gets wrong:
    # if the heuristic ever solves it, pick another instance where it does not.
    weights, fit = [23, 15, 14, 22, 18], [2, 1, 2, 1, 2]
    clients = [
        client(f"c{i}", 100 + 30 * k, 100, (30,) * 3, float(w))
        for i, (w, k) in enumerate(zip(weights, fit, strict=True))
    ]
    exact = solve_schedule(clients, [1] * 3, SchedulerConfig())
    greedy = solve_schedule(clients, [1] * 3, HEURISTIC)
    ref = brute_force(clients, [1] * 3, SchedulerConfig(), {0, 1, 2})
    assert greedy.stage1_coverage < exact.stage1_coverage == ref.t_star
    assert exact.optimal


@pytest.mark.parametrize("config", [SchedulerConfig(), HEURISTIC], ids=["milp", "heuristic"])
def test_min_cover_holds_where_coverage_alone_would_need_fewer_clients(
    config: SchedulerConfig,
) -> None:
    clients = [client("heavy", 1000, 100, (30,) * 3, 100.0)] + [
        client(f"light{i}", 1000, 100, (30,) * 3, 1.0) for i in range(3)
    ]
    config = replace(config, min_cover=2, epsilon=0.9)
    schedule = solve_schedule(clients, [10] * 3, config)
    check_feasible(schedule, clients, [10] * 3, config)
    assert not schedule.uncovered_blocks


def test_lp_bound_is_above_the_optimum_and_tight_on_a_divisible_instance() -> None:
    clients, block_params, config = small_instance(4, 3, 1)
    schedule = solve_schedule(clients, block_params, config)
    ref = brute_force(clients, block_params, config, set(schedule.required_blocks))
    bound = coverage_upper_bound(clients, block_params, config, schedule.required_blocks)
    assert bound >= ref.t_star - 1e-9
    # Four equal clients that fit two of four blocks each: every block reaches 2 exactly.
    even = [client(f"c{i}", 160, 100, (30,) * 4, 1.0) for i in range(4)]
    assert coverage_upper_bound(even, [1] * 4, SchedulerConfig(), range(4)) == pytest.approx(2.0)


def test_milp_path_honours_its_time_limit() -> None:
    clients = random_clients(np.random.default_rng(5), 40, 12)
    schedule = solve_schedule(
        clients, [1] * 12, SchedulerConfig(time_limit_s=0.5, milp_max_clients=100)
    )
    assert schedule.method == "milp"
    assert schedule.solve_s < 2.5


def test_schedule_matches_the_shared_memory_model() -> None:
    footprint = ModelFootprint(
        block_params=(3_540_096,) * 4,
        quantizable_block_params=(3_538_944,) * 4,
        embed_head_params=28_312_128,
        hidden_size=576,
        vocab_size=49152,
        num_layers=4,
        intermediate_size=1536,
    )
    settings = [MemorySettings(), MemorySettings(frozen_dtype="int8", batch_size=4)]
    clients = [
        ClientSpec(f"c{i}", budget, linear_memory_model(footprint, settings[i % 2]), 10.0 + i)
        for i, budget in enumerate([700 * 2**20, 800 * 2**20, 1200 * 2**20])
    ]
    schedule = solve_schedule(clients, footprint.block_params, SchedulerConfig())
    for i, c in enumerate(clients):
        if c.client_id in schedule.assignments:
            blocks = schedule.assignments[c.client_id]
            used = client_memory_bytes(footprint, settings[i % 2], blocks)
            assert schedule.memory_bytes[c.client_id] == used <= c.budget_bytes


# --- inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clients", "error"),
    [
        ([client("a", 1, 0, (1, 1)), client("a", 1, 0, (1, 1))], "appears twice"),
        ([client("a", 1, 0, (1,))], "memory model has 1 blocks"),
        ([client("a", 1, 0, (1, 1), weight=-1.0)], "weight"),
    ],
)
def test_malformed_inputs_are_refused_with_the_reason(clients, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        solve_schedule(clients, [1, 1], SchedulerConfig())


def test_previous_assignment_naming_a_missing_block_is_an_assignment_error() -> None:
    with pytest.raises(AssignmentError, match="blocks \\[5\\]"):
        solve_schedule(
            [client("a", 9, 0, (1, 1), previous=frozenset({5}))], [1, 1], SchedulerConfig()
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 1.0},
        {"min_cover": 0},
        {"stability_bonus": 1.0},
        {"min_steps": 5, "max_steps": 2},
    ],
)
def test_config_out_of_range_is_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**kwargs)


# --- local steps ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "deadline", "expected"),
    [
        (2.0, 60.0, 30),  # as many as fit
        (2.5, 10.0, 4),  # floor, never over the deadline
        (0.01, 60.0, 32),  # clamped to max_steps
        (100.0, 60.0, 1),  # never below min_steps: excluding it is the scheduler's call
        (None, 60.0, 1),  # not measured yet: the first round measures it
        (2.0, None, 32),  # no deadline: the fixed round length
    ],
)
def test_local_steps_fill_the_deadline_within_bounds(step, deadline, expected) -> None:
    assert local_steps(step, deadline, min_steps=1, max_steps=32) == expected


@pytest.mark.parametrize(("step", "deadline"), [(0.0, 10.0), (-1.0, 10.0), (1.0, math.nan)])
def test_local_steps_refuse_meaningless_times(step, deadline) -> None:
    with pytest.raises(ValueError):
        local_steps(step, deadline)


def test_local_steps_from_the_deadline_stop_at_a_lower_max_steps() -> None:
    # A measured client fills the deadline up to max_steps; an unmeasured one runs min_steps.
    assert local_steps(1.0, 10.0, min_steps=1, max_steps=8) == 8
    assert local_steps(None, 10.0, min_steps=1, max_steps=8) == 1


def test_brute_force_reference_enumerates_every_assignment() -> None:
    """The reference itself, on a case solved by hand: two clients that fit one of two
    blocks each must split them, so t* is the lighter weight; with only block 0 required,
    both may join it (t* = 7) and the cover score drops to one block."""
    clients = [client("a", 140, 100, (30, 30), 2.0), client("b", 140, 100, (30, 30), 5.0)]
    both = brute_force(clients, [10, 10], SchedulerConfig(epsilon=0.0), {0, 1})
    assert (both.best_cover_score, both.cover_score) == (2.5, 2.5)
    assert (both.t_star, both.least_objective) == (2.0, 20.0)
    one = brute_force(clients, [10, 10], SchedulerConfig(epsilon=0.0), {0})
    assert (one.cover_score, one.t_star, one.least_objective) == (1.25, 7.0, 20.0)
