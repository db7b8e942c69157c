"""The client's local training loop: rounds, revert, sync and re-assignment."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from fixtures_text import make_tokenizer
from tiny_models import tiny_llama_config

from zorba_common.messages import AlphaDelta, Assignment, HyperParams, RunInfo
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.trainer import LocalTrainer, SyncError
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.engine.coefficients import AlphaIncrement, apply_increments_, block_materializer
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import RandomInitSource

HYPER = HyperParams(lr=1e-3, mu=1e-3, batch_size=4, seq_len=16)
POSITIVE = "great good fun".split()
NEGATIVE = "terrible bad boring".split()


def examples(count: int, seed: int = 0) -> list[ClassificationExample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        label = int(rng.integers(2))
        words = rng.choice(POSITIVE if label else NEGATIVE, 2).tolist() + ["movie"]
        out.append(ClassificationExample(" ".join(rng.permutation(words)), label))
    return out


def make_trainer(num_blocks: int = 3, frozen: str = "fp32", init: float = 0.02) -> LocalTrainer:
    tokenizer = make_tokenizer()
    config = tiny_llama_config(num_layers=num_blocks, vocab=160, initializer_range=init)
    source = RandomInitSource(config, seed=1,
                              tokenizer=tokenizer)
    run = RunInfo(run_id="r", seed=5, pool_size=64, num_blocks=num_blocks,
                  model_fingerprint=source.fingerprint, hyper=HYPER, round_duration_s=60,
                  poll_timeout_s=10, max_abs_scalar=1e4)
    task = LocalTask(examples(32), tokenizer, seed=2)
    return LocalTrainer(source, LoadConfig(frozen_dtype=frozen), run, task, refresh_every=1000)


def assignment(round_: int, blocks: tuple[int, ...], ks: tuple[int, ...], version: int = 0) -> Assignment:
    return Assignment(round=round_, base_version=version, blocks=blocks, pool_indices=ks,
                      hyper=HYPER, deadline_in_s=60, deadline_unix=0)


def state_of(trainer: LocalTrainer, block: int) -> dict[str, torch.Tensor]:
    assert trainer.loaded is not None
    return {n: p.detach().clone() for n, p in trainer.loaded.blocks[block].state_dict().items()}


def delta(version: int, ks: tuple[int, ...], blocks: tuple[int, ...], seed: int) -> AlphaDelta:
    values = np.random.default_rng(seed).normal(0, 1e-3, (len(ks), len(blocks)))
    return AlphaDelta.from_matrix(version, version, ks, blocks, values)


def test_a_round_reports_one_scalar_per_step_and_leaves_the_model_as_it_found_it() -> None:
    trainer = make_trainer()
    trainer.hold((0, 2))
    before = {b: state_of(trainer, b) for b in range(3)}
    outcome = trainer.train_round(assignment(1, (0, 2), (3, 9, 3, 40)), threading.Event())
    assert [k for k, _ in outcome.steps] == [3, 9, 3, 40]
    assert all(np.isfinite(g) for _, g in outcome.steps)
    assert outcome.num_samples == 16 and not outcome.cancelled
    assert outcome.peak_memory_bytes > 0 and outcome.step_time_s > 0
    for b in range(3):
        after = state_of(trainer, b)
        assert all(torch.equal(after[n], before[b][n]) for n in after), b


def test_a_cancelled_round_reports_the_steps_taken_and_reverts() -> None:
    trainer = make_trainer()
    cancel = threading.Event()
    calls = 0
    original = trainer.task.next_batch

    def cancelling_next_batch(batch_size: int, seq_len: int):  # cancel after two steps
        nonlocal calls
        calls += 1
        if calls == 2:
            cancel.set()
        return original(batch_size, seq_len)

    trainer.task.next_batch = cancelling_next_batch  # type: ignore[method-assign]
    trainer.hold((1,))
    before = state_of(trainer, 1)
    outcome = trainer.train_round(assignment(1, (1,), (1, 2, 3, 4)), cancel)
    assert outcome.cancelled and [k for k, _ in outcome.steps] == [1, 2]
    assert all(torch.equal(v, before[n]) for n, v in state_of(trainer, 1).items())


def test_synced_and_reassigned_blocks_equal_base_plus_alpha() -> None:
    trainer = make_trainer()
    trainer.hold((0,))
    trainer.apply_deltas([delta(2, (4, 7), (0, 1), seed=1), delta(1, (1, 4), (0, 2), seed=0)])
    assert trainer.table.version == 2
    materialize = block_materializer(trainer.source.block_state_dict, trainer.table, trainer.run.seed)
    held = state_of(trainer, 0)
    for name, tensor in materialize(0).items():  # incremental sync against a rebuild
        assert torch.allclose(held[name], tensor, rtol=1e-5, atol=1e-7), name
    trainer.hold((1, 2))  # newly assigned blocks are rebuilt from base + alpha
    for block in (1, 2):
        held = state_of(trainer, block)
        assert all(torch.equal(held[n], t) for n, t in materialize(block).items())


def test_out_of_order_or_stale_versions_are_refused() -> None:
    trainer = make_trainer()
    with pytest.raises(SyncError, match="version 3 cannot follow local version 0"):
        trainer.apply_deltas([delta(3, (1,), (0,), seed=0)])
    with pytest.raises(SyncError, match="trains on alpha version 2 but this client is at 0"):
        trainer.train_round(assignment(1, (0,), (1,), version=2), threading.Event())


def test_rounds_with_server_style_updates_lower_the_task_loss() -> None:
    # The server's rule for a single client: alpha[k, b] += lr * g for each step.
    trainer = make_trainer(num_blocks=2, init=0.2)
    version = 0
    blocks = (0, 1)
    eval_batch = trainer.task.collator(HYPER.seq_len)(trainer.task.examples)
    hyper = HyperParams(lr=1e-2, mu=1e-3, batch_size=8, seq_len=16)
    trainer.hold(blocks)
    loss_before = float(trainer.task.loss_fn(trainer.loaded.model, eval_batch))
    for round_ in range(1, 16):
        ks = tuple(range(round_ * 4, round_ * 4 + 4))
        work = Assignment(round=round_, base_version=version, blocks=blocks, pool_indices=ks,
                          hyper=hyper, deadline_in_s=60, deadline_unix=0)
        outcome = trainer.train_round(work, threading.Event())
        sums: dict[int, float] = {}
        for k, g in outcome.steps:
            sums[k] = sums.get(k, 0.0) + hyper.lr * g
        ordered = tuple(sorted(sums))
        matrix = np.array([[sums[k]] * len(blocks) for k in ordered])
        version += 1
        trainer.apply_deltas([AlphaDelta.from_matrix(version, round_, ordered, blocks, matrix)])
    loss_after = float(trainer.task.loss_fn(trainer.loaded.model, eval_batch))
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)


class FakeMonotonic:
    """`time` as zorba_edge.client.trainer sees it, on a clock the test moves: the gate's
    arithmetic is checked exactly, whatever a busy machine does to real sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    from zorba_edge.client import trainer

    clock = FakeMonotonic()
    monkeypatch.setattr(trainer, "time", clock)
    return clock


def test_a_round_gated_by_finish_by_ends_its_last_step_before_the_instant(
        fake_time: FakeMonotonic) -> None:
    """A cancel flag lets the step in progress overrun the deadline; the gate starts a step
    only when this round's own step time says it will end in time."""
    import threading

    from zorba_edge.client.trainer import finish_by

    calls: list[float] = []

    def slow_step(t: int) -> None:
        calls.append(fake_time.now)
        fake_time.now += 0.15

    stop_by = fake_time.now + 0.5
    gate = finish_by(stop_by, prior_step_s=0.01)
    cancel = threading.Event()
    for t in range(20):
        if cancel.is_set() or not gate(t, 1):
            break
        slow_step(t)
    # Steps at 0, 0.15 and 0.30 end by 0.45; a fourth would end at 0.60.
    assert len(calls) == 3
    assert fake_time.now <= stop_by


def test_finish_by_judges_a_batch_of_directions_by_all_its_steps(
        fake_time: FakeMonotonic) -> None:
    """A batch of 4 directions takes 4 steps' time: judged by one step's time, a last batch
    started 0.1 s before the deadline and ended 0.1 s after it (the quickstart's largest
    client missed its round so)."""
    from zorba_edge.client.trainer import finish_by

    per_step, directions = 0.05, 4
    stop_by = fake_time.now + 0.5
    gate = finish_by(stop_by, prior_step_s=per_step)
    batches = 0
    for t in range(0, 40, directions):
        if not gate(t, directions):
            break
        fake_time.now += per_step * directions
        batches += 1
    assert batches == 2  # a third would end at 0.6 s
    assert fake_time.now <= stop_by


def test_first_steps_starts_no_batch_that_would_pass_its_count() -> None:
    from zorba_edge.client.trainer import first_steps

    gate = first_steps(6)
    assert gate(0, 4) and not gate(4, 4) and gate(4, 2) and not gate(6, 1)


@pytest.mark.parametrize("estimator, directions, forwards_per_batch",
                         [("antithetic", 1, 2), ("antithetic", 3, 6), ("one-sided", 3, 4),
                          ("normalised", 3, 4)])
def test_each_reported_scalar_moved_theta_by_lr_g_z_whatever_the_estimator(
        estimator: str, directions: int, forwards_per_batch: int) -> None:
    """The server adds lr * g per reported (k, g); the local steps must be the same moves, so
    that alpha rebuilds what the client trained on (up to the roundings of the moves)."""
    import dataclasses
    import threading

    from zorba_edge.client.trainer import run_local_steps
    from zorba_edge.engine.coefficients import AlphaIncrement, apply_increments_

    trainer = make_trainer()
    hyper = dataclasses.replace(HYPER, lr=1e-2, estimator=estimator, directions=directions)
    ks = tuple(range(10, 10 + 2 * directions))
    job = dataclasses.replace(assignment(1, (0, 2), ks), hyper=hyper)
    loaded = trainer.hold(job.blocks)
    blocks = {b: loaded.trainable_parameters(b) for b in job.blocks}
    before = {b: [(n, t.detach().clone()) for n, t in blocks[b]] for b in blocks}
    seen: dict[int, dict[int, list[torch.Tensor]]] = {}

    def look(t: int, count: int) -> bool:  # before each batch: the weights the earlier batches left
        seen[t] = {b: [p.detach().clone() for _, p in blocks[b]] for b in blocks}
        return True

    outcome = run_local_steps(loaded.model, blocks, trainer.task, job, trainer.run, "cpu",
                              threading.Event(), look)
    assert [k for k, _ in outcome.steps] == list(ks)
    assert outcome.forwards == 2 * forwards_per_batch + 1  # and the check batch
    first_batch = [AlphaIncrement(k, b, hyper.lr * g)
                   for k, g in outcome.steps[:directions] for b in job.blocks]
    apply_increments_(before, trainer.run.seed, first_batch)
    for b in job.blocks:
        for (_, expected), got in zip(before[b], seen[directions][b], strict=True):
            assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    moved = [not torch.equal(a, c) for b in job.blocks
             for a, c in zip(seen[0][b], seen[directions][b], strict=True)]
    assert all(moved)  # the first batch really stepped


def test_kept_snapshot_buffers_and_no_heap_trim_change_no_value_of_a_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's way of running the local loop (snapshot into buffers kept between
    rounds, no heap trim) gives the same report and leaves the same weights, round after
    round, as a real client's."""
    from zorba_edge.client import trainer as trainer_module
    from zorba_edge.client.trainer import run_local_steps
    from zorba_edge.engine.snapshot import SnapshotBuffers

    real, sim = make_trainer(), make_trainer()
    buffers = SnapshotBuffers()
    trims: list[int] = []
    monkeypatch.setattr(trainer_module, "release_freed_memory", lambda: trims.append(1))
    for round_ in range(3):
        job = assignment(round_ + 1, (0, 2), tuple(range(8 * round_, 8 * round_ + 6)))
        outcomes = []
        for trainer, kept in ((real, None), (sim, buffers)):
            loaded = trainer.hold(job.blocks)
            blocks = {b: loaded.trainable_parameters(b) for b in job.blocks}
            outcomes.append(run_local_steps(
                loaded.model, blocks, trainer.task, job, trainer.run, "cpu", threading.Event(),
                snapshot_buffers=kept, release_memory=kept is None))
            # a sync between rounds, so that each round starts from other weights
            apply_increments_(blocks, trainer.run.seed,
                              [AlphaIncrement(k, b, 1e-3 * g) for k, g in outcomes[-1].steps
                               for b in job.blocks])
        assert outcomes[0].steps == outcomes[1].steps
        assert outcomes[0].loss_check == outcomes[1].loss_check
        for b in range(3):
            assert all(torch.equal(a, c) for a, c in zip(state_of(real, b).values(),
                                                         state_of(sim, b).values(), strict=True))
    # The real client's rounds only, twice each: after the check forwards (before the steps)
    # and at the end.
    assert len(trims) == 6
    assert buffers.nbytes > 0


def test_normalised_batches_have_unit_spread_and_a_short_last_batch_is_left_unreported() -> None:
    """A spread needs two differences: of 5 pool indices at 2 directions a batch, the last
    one is not measured (and not reported); each batch's scalars are its differences over
    their standard deviation, so their spread is 1 whatever the model's gradient scale."""
    import dataclasses
    import statistics
    import threading

    from zorba_edge.client.trainer import run_local_steps

    trainer = make_trainer()
    hyper = dataclasses.replace(HYPER, lr=1e-3, estimator="normalised", directions=2)
    job = dataclasses.replace(assignment(1, (0, 2), (10, 11, 12, 13, 14)), hyper=hyper)
    loaded = trainer.hold(job.blocks)
    blocks = {b: loaded.trainable_parameters(b) for b in job.blocks}
    outcome = run_local_steps(loaded.model, blocks, trainer.task, job, trainer.run, "cpu",
                              threading.Event())
    assert [k for k, _ in outcome.steps] == [10, 11, 12, 13]
    assert outcome.forwards == 2 * 3 + 1
    for first, second in (outcome.steps[0:2], outcome.steps[2:4]):
        assert statistics.stdev([first[1], second[1]]) == pytest.approx(1.0)


def test_stale_frozen_blocks_are_rebuilt_a_few_a_round_the_stalest_first() -> None:
    """Rebuilding every frozen block at once replays each block's whole alpha column: in a
    20-minute quickstart that took a whole round and 28% over a 1 GiB budget."""
    from zorba_edge.client import trainer as trainer_module

    trainer = make_trainer(num_blocks=6)
    trainer.refresh_every = 2
    trainer.hold((0,))
    assert trainer.loaded is not None
    rebuilt: list[int] = []
    install = trainer.loaded.install_block

    def spy(block: int, state: dict[str, torch.Tensor], trainable: bool) -> None:
        rebuilt.append(block)
        install(block, state, trainable)

    trainer.loaded.install_block = spy  # type: ignore[method-assign]
    for version in (1, 2):
        trainer.apply_deltas([delta(version, (3, 7), tuple(range(6)), seed=version)])
    per_round = []
    for _ in range(3):
        rebuilt.clear()
        trainer.hold((0,))
        per_round.append(sorted(rebuilt))
    limit = trainer_module.REFRESH_BLOCKS_PER_ROUND
    assert all(len(r) <= limit for r in per_round)
    assert sorted(b for r in per_round for b in r) == [1, 2, 3, 4, 5]  # each stale one, once
    expected = block_materializer(trainer.source.block_state_dict, trainer.table, trainer.run.seed)
    for b in range(1, 6):
        got = state_of(trainer, b)
        want = expected(b)
        assert all(torch.allclose(got[n], want[n], atol=1e-7) for n in want), b


def test_a_first_round_judges_its_batches_by_the_estimators_forwards_per_step() -> None:
    """The profile's step is two forwards; a one-sided batch of 4 costs 5 forwards, 1.25 a
    step. Before any round, the gate's estimate must be the latter, or a batch the plan sized
    to fit looks 1.6x too long (every quickstart client sat its first round out)."""
    from zorba_common.messages import HyperParams
    from zorba_common.run_defaults import ANTITHETIC, ONE_SIDED
    from zorba_edge.client.daemon import step_estimate_s
    from zorba_edge.client.modes.client_mode import RoundHooks
    from zorba_edge.client.modes.fedavg_training import FORWARDS_PER_STEP
    from zorba_edge.engine.zo import forwards_per_step

    assert forwards_per_step(ONE_SIDED, 4) == 1.25 and forwards_per_step(ANTITHETIC, 4) == 2.0
    one_sided = HyperParams(lr=1e-4, mu=1e-3, batch_size=8, seq_len=48, estimator=ONE_SIDED,
                            directions=4)
    zo_forwards = RoundHooks().step_forwards(one_sided)
    assert step_estimate_s(0.0, 0.8, zo_forwards) == pytest.approx(1.0)
    assert step_estimate_s(0.0, 0.8, FORWARDS_PER_STEP) == pytest.approx(2.4)  # fwd + bwd
    assert step_estimate_s(0.7, 0.8, zo_forwards) == 0.7  # a measured round wins


def test_a_client_whose_step_estimate_is_stale_tries_a_batch_again_within_rounds() -> None:
    """A step estimate is only measured again by a step taken. A 20-minute e2e client whose
    estimate rose to 6 s a step on a busy machine never fit a batch of 4 in what was left of a
    round again (24 s against ~20 s), so it never measured the faster steps it could take."""
    from zorba_edge.client.daemon import next_step_estimate_s

    batch, room_s, true_step_s = 4, 20.0, 4.5
    estimate, trained_in = 6.0, None
    for round_ in range(1, 6):
        runs = estimate * batch <= room_s  # the trainer's gate before the first batch
        estimate = next_step_estimate_s(estimate, true_step_s if runs else 0.0)
        if runs:
            trained_in = round_
            break
    assert trained_in == 2 and estimate == true_step_s  # one round out, then measured again
    assert next_step_estimate_s(6.0, 7.5) == 7.5  # a measured round wins, slower or faster
