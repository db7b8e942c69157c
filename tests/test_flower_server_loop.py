"""The Flower server app's loop against a fake Grid in this process (no Flower processes):
profiles by QUERY, plans that follow each node's budget, per-node TRAIN messages with the
round's TTL, failed nodes dropped, and a resume from the checkpoint after a crash."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower app needs the `flower` extra (pip install -e '.[flower]')")

from flower_fakes import Crash, FakeGrid, Handler  # noqa: E402
from flwr.app import Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.common.logger import LOGGER_NAME  # noqa: E402
from server_fakes import config_dict, profile  # noqa: E402

from zorba_common.messages import DeviceProfile, Report
from zorba_flower import codec  # noqa: E402
from zorba_flower.server_loop import FlowerRounds, LoopSettings, NoRoundError  # noqa: E402
from zorba_server.config import ConfigError, config_from_dict  # noqa: E402
from zorba_server.engine import RoundEngine  # noqa: E402
from zorba_server.rounds import APPLIED, FAILED, RoundPlan  # noqa: E402


def node(device: DeviceProfile, *, fail_from_round: int | None = None, silent: bool = False,
         partition: int = 0, loss: float = 1.0) -> Handler:
    """A well-behaved node: its profile on QUERY, g = 0.01 * (k + 1) for every step on TRAIN
    and a mean training loss of `loss`."""

    def handle(msg: Message) -> RecordDict | Error | None:
        if msg.metadata.message_type == MessageType.QUERY:
            codec.read_profile_query(msg.content)
            return codec.profile_reply(device, partition)
        instruction = codec.read_train_instruction(msg.content)
        a = instruction.assignment
        if fail_from_round is not None and a.round >= fail_from_round:
            return None if silent else Error(code=0, reason="the ClientApp raised")
        steps = tuple((k, 0.01 * (k + 1)) for k in a.pool_indices)
        report = Report(f"r{a.round}", a.base_version, steps, 4 * len(steps), loss, loss, 0, 0.01)
        return codec.report_reply(report, codec.Timing(0.5, 0.25, 10**8))

    return handle


def make_engine(tmp_path: Path, **run: object) -> RoundEngine:
    defaults: dict[str, object] = {"min_clients": 2, "max_rounds": 3, "memory_headroom": 0.0}
    config = config_from_dict(config_dict(tmp_path / "unused.sqlite3", **(defaults | run)))
    return RoundEngine(config)


def budgets(engine: RoundEngine) -> tuple[int, int]:
    """One block's worth and every block's worth of the fake model."""
    model = engine.memory_model(profile(), 1.0)
    return model.fixed_bytes + max(model.block_bytes) + 1, model.fixed_bytes + sum(model.block_bytes) + 1


def rounds_loop(engine: RoundEngine, tmp_path: Path, **kw: object) -> FlowerRounds:
    settings = LoopSettings(tmp_path / "ckpt.msgpack", "run-1", idle_wait_s=0.0, max_idle_s=0.0)
    return FlowerRounds(engine, settings, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


def test_rounds_follow_each_nodes_budget_and_apply_their_reports(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    small, large = budgets(engine)
    grid = FakeGrid({11: node(profile(50, budget=small)), 22: node(profile(50, budget=large))})
    loop = rounds_loop(engine, tmp_path)
    loop.run(grid)
    assert engine.finished and engine.version == 3
    assert [r.status for r in loop.rounds] == [APPLIED] * 3
    for r in loop.rounds:
        assert len(r.assigned[11]) == 1 and len(r.assigned[22]) > 1  # what each budget holds
        assert r.reported == (11, 22) and r.overhead_s is not None
    types = [m.metadata.message_type for m in grid.sent]
    assert types[:2] == [MessageType.QUERY] * 2 and types[2:] == [MessageType.TRAIN] * 6
    # Each TRAIN message lives as long as its round, and the wait ends at the deadline.
    train = grid.sent[2]
    assert train.metadata.ttl == pytest.approx(engine.config.run.round_duration_s, abs=1.0)
    assert grid.timeouts[2] == pytest.approx(engine.config.run.round_duration_s, abs=1.0)
    assert engine.alpha is not None and np.count_nonzero(engine.alpha) > 0


class FlowerLines(logging.Handler):
    """Stands where Flower's console handler stands: on the "flwr" logger, at INFO."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


@pytest.fixture
def flower_lines() -> Iterator[FlowerLines]:
    handler = FlowerLines()
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    yield handler
    logging.getLogger(LOGGER_NAME).removeHandler(handler)


def test_each_round_logs_its_status_reports_loss_and_version_through_flowers_logger(
        tmp_path: Path, flower_lines: FlowerLines) -> None:
    engine = make_engine(tmp_path, max_rounds=2)
    _, large = budgets(engine)
    grid = FakeGrid({11: node(profile(50, budget=large), loss=0.75),
                     22: node(profile(50, budget=large), loss=0.75)})
    rounds_loop(engine, tmp_path).run(grid)
    closed = [(level, line) for level, line in flower_lines.lines if " applied: " in line]
    assert [level for level, _ in closed] == [logging.INFO] * 2
    for n, (_, line) in enumerate(closed, 1):
        assert line.startswith(f"round {n} applied: 2 of 2 reports, loss 0.75, version {n}, ")


def test_messages_are_built_with_flowers_constructor_not_the_deprecated_grid_method(
        tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_rounds=1)
    _, large = budgets(engine)
    grid = FakeGrid({11: node(profile(50, budget=large)), 22: node(profile(50, budget=large))})

    def deprecated(*args: object, **kwargs: object) -> Message:
        raise AssertionError("Grid.create_message is deprecated in Flower 1.42 and logs so")

    grid.create_message = deprecated  # type: ignore[method-assign]
    loop = rounds_loop(engine, tmp_path)
    loop.run(grid)
    assert engine.version == 1 and {m.metadata.dst_node_id for m in grid.sent} == {11, 22}


def test_a_node_whose_message_fails_is_dropped_and_the_others_go_on(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, min_clients=1, max_rounds=3)
    small, large = budgets(engine)
    grid = FakeGrid({11: node(profile(50, budget=large), fail_from_round=2),
                     22: node(profile(50, budget=large), fail_from_round=3, silent=True),
                     33: node(profile(50, budget=small))})
    loop = rounds_loop(engine, tmp_path)
    loop.run(grid)
    assert [r.dropped for r in loop.rounds] == [(), (11,), (22,)]
    assert [r.reported for r in loop.rounds] == [(11, 22, 33), (22, 33), (33,)]
    assert [r.status for r in loop.rounds] == [APPLIED] * 3
    assert set(engine.members) == {"p000000-node-33"} and set(loop.refused) == {11, 22}


def test_a_node_the_superlink_lost_is_dropped_though_the_error_comes_from_the_superlink(
        tmp_path: Path) -> None:
    engine = make_engine(tmp_path, min_clients=1, max_rounds=2)
    _, large = budgets(engine)
    grid = FakeGrid({11: node(profile(50, budget=large)), 22: node(profile(50, budget=large))})
    loop = rounds_loop(engine, tmp_path)
    loop.run_round(grid, _admitted_plan(loop, grid))
    grid.lost.add(22)
    loop.run(grid)
    assert [r.dropped for r in loop.rounds] == [(), (22,)]
    assert [r.reported for r in loop.rounds] == [(11, 22), (11,)]


def _admitted_plan(loop: FlowerRounds, grid: FakeGrid) -> RoundPlan:
    loop._admit(grid)
    plan = loop.engine.propose_round(loop.clock())
    assert plan is not None
    return plan


def test_a_node_the_engine_refuses_is_never_planned(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, min_clients=1, max_rounds=1)
    _, large = budgets(engine)
    grid = FakeGrid({11: node(profile(50, budget=large)), 22: node(profile(50, budget=1000))})
    loop = rounds_loop(engine, tmp_path)
    loop.run(grid)
    assert "cheapest block" in loop.refused[22] and list(loop.rounds[0].assigned) == [11]


def test_with_too_few_nodes_the_loop_gives_up_with_the_engines_reason(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, min_clients=3)
    _, large = budgets(engine)
    with pytest.raises(NoRoundError, match="waiting for clients: 1 active, 3 needed"):
        rounds_loop(engine, tmp_path).run(FakeGrid({11: node(profile(50, budget=large))}))


def test_a_crashed_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_rounds=4)
    small, large = budgets(engine)
    nodes = {11: node(profile(50, budget=small)), 22: node(profile(50, budget=large))}
    first = rounds_loop(engine, tmp_path)
    with pytest.raises(Crash):
        first.run(FakeGrid(nodes, crash_on_round=3))
    assert engine.version == 2 and engine.open is not None and engine.alpha is not None
    alpha_at_crash = engine.alpha.copy()

    # A new SuperLink: new node ids, a fresh engine from the same config, the same file.
    fresh = make_engine(tmp_path, max_rounds=4)
    second = rounds_loop(fresh, tmp_path)
    assert second.resumed is not None and second.resumed.abandoned_round == 3
    assert fresh.version == 2 and np.array_equal(fresh.alpha, alpha_at_crash)
    assert [r.status for r in fresh.history] == [APPLIED, APPLIED, FAILED]
    second.run(FakeGrid({33: nodes[11], 44: nodes[22]}))
    assert fresh.version == 4 and [r.round for r in second.rounds] == [4, 5]
    assert set(fresh.members) == {"p000000-node-33", "p000000-node-44"}

    # The resumed rounds trained on from the checkpoint's table.
    assert [d.version for d in fresh.deltas] == [1, 2, 3, 4]
    assert not np.array_equal(fresh.alpha, alpha_at_crash)


def test_a_checkpoint_of_another_run_config_is_refused(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_rounds=1)
    _, large = budgets(engine)
    rounds_loop(engine, tmp_path).run(FakeGrid({11: node(profile(50, budget=large)),
                                                22: node(profile(50, budget=large))}))
    with pytest.raises(ConfigError, match="seed=0, pool_size=64.*seed=5"):
        rounds_loop(make_engine(tmp_path, seed=5), tmp_path)


def test_members_join_in_partition_order_whatever_their_node_ids(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_rounds=1)
    _, large = budgets(engine)
    grid = FakeGrid({5: node(profile(50, budget=large), partition=1),
                     90: node(profile(50, budget=large), partition=0)})
    rounds_loop(engine, tmp_path).run(grid)
    # The engine takes clients in this order (and sums reports in id order): zorba_sim's.
    assert list(engine.members) == ["p000000-node-90", "p000001-node-5"]
    assert sorted(engine.members) == list(engine.members)


def test_train_messages_carry_every_published_delta_across_a_resume(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_rounds=4, catch_up_rounds=1)
    small, large = budgets(engine)
    nodes = {11: node(profile(50, budget=small)), 22: node(profile(50, budget=large))}
    with pytest.raises(Crash):
        rounds_loop(engine, tmp_path).run(FakeGrid(nodes, crash_on_round=3))
    assert len(engine.deltas) == 1  # the engine keeps one; the history keeps all

    fresh = make_engine(tmp_path, max_rounds=4, catch_up_rounds=1)
    grid = FakeGrid(nodes)
    resumed = rounds_loop(fresh, tmp_path)
    assert [d.version for d in resumed.history] == [1, 2]
    resumed.run(grid)
    sent = [codec.read_train_instruction(m.content) for m in grid.sent
            if m.metadata.message_type == MessageType.TRAIN]
    assert [[d.version for d in i.deltas] for i in sent] == [[1, 2]] * 2 + [[1, 2, 3]] * 2
    assert all(i.assignment.base_version == len(i.deltas) for i in sent)
    # The history adds up to the server's table, bit for bit.
    total = np.zeros_like(fresh.alpha)
    for d in resumed.history:
        total[np.ix_(d.pool_indices, d.blocks)] += d.matrix().astype(np.float64)
    assert total.tobytes() == fresh.alpha.tobytes()
