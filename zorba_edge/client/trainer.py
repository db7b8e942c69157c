"""The local training loop of one client (docs/design.md §2), free of any networking.

Per round: bring the held model to the assignment (re-materialising from base + alpha
only the blocks whose role changed), snapshot the assigned blocks (to disk, off the memory
budget: zorba_edge.engine.snapshot), take one seeded ZO step per pool index, then revert,
so that the next sync starts from the global model. Alpha
increments from the server are applied to the trainable blocks as they arrive; a frozen
(quantised) block is rebuilt from base + alpha once it is `refresh_every` versions stale, at
most `REFRESH_BLOCKS_PER_ROUND` of them a round: a rebuild replays every (k, alpha) of the
block's column, so rebuilding all frozen blocks at once took a whole round (and 28% over a
1 GiB budget) in a 20-minute quickstart.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from zorba_common.errors import ZorbaError
from zorba_common.limits import MAX_LOSS
from zorba_common.messages import AlphaDelta, AlphaState, Assignment, Report, RunInfo
from zorba_common.readout import readout_block, table_columns
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.memory_probe import PeakMemoryProbe
from zorba_edge.client.readout_setup import client_readout, rebuild_readout
from zorba_edge.engine.coefficients import (
    AlphaIncrement,
    CoefficientTable,
    apply_increments_,
    block_materializer,
)
from zorba_edge.engine.directions import BlockTensors, NamedTensors
from zorba_edge.engine.fluency import generic_batch, generic_loss
from zorba_edge.engine.snapshot import RoundSnapshot, Snapshot, SnapshotBuffers, SpilledSnapshot
from zorba_edge.engine.zo import (
    ESTIMATORS,
    MIN_DIRECTIONS,
    ZOConfig,
    readout_estimate,
    record_first_forward,
)
from zorba_edge.model.assignment import check_assignment
from zorba_edge.model.loading import LoadConfig, LoadedModel, load_model, release_freed_memory
from zorba_edge.model.progress import Progress, tracked
from zorba_edge.model.readout import HeadCall, LabelReadout
from zorba_edge.model.sources import ModelSource

StepGate = Callable[[int, int], bool]
"""on_step(t, count): whether to start the batch of local steps t .. t + count - 1 (pool
indices: a zeroth-order batch measures `directions` of them at once); False ends the round
there."""


def first_steps(count: int) -> StepGate:
    """A gate that lets steps 0 .. count-1 run and ends the round there: a batch that would
    run past step count-1 does not start."""
    return lambda t, batch: t + batch <= count


def finish_by(stop_by: float, prior_step_s: float) -> StepGate:
    """Start a batch only if it should end by `stop_by` (a time.monotonic() instant), judging
    by this round's mean time per step so far (before the first: `prior_step_s`) times the
    batch's steps. A cancel flag alone lets the batch in progress run past the deadline, and
    then the whole round's report arrives too late to count; judging a batch of 4 directions
    by one step's time let the quickstart's largest client start a last batch 4x longer than
    the time left and miss the round."""
    started = time.monotonic()

    def fits(t: int, batch: int) -> bool:
        now = time.monotonic()
        per_step = (now - started) / t if t else prior_step_s
        return now + per_step * batch <= stop_by

    return fits


class SyncError(ZorbaError):
    """The local coefficient table is not at the version a delta or an assignment needs."""


@dataclass(frozen=True)
class LocalRoundResult:
    """What a client's local round produced (the server's own RoundOutcome is its verdict)."""

    steps: tuple[tuple[int, float], ...]
    """(k_t, g_t) per step taken, in order."""
    num_samples: int
    loss_mean: float
    loss_last: float
    peak_memory_bytes: int
    step_time_s: float
    cancelled: bool
    upload: bytes | None = None
    """fedavg only: the trained block weights (zorba_common.weight_files format) to PUT."""

    local_steps: int | None = None
    """Steps taken, when they are not the ZO steps themselves (fedavg)."""

    forwards: int = 0
    """Forward passes the round took (what the simulator counts), the check batch's included."""

    loss_check: float | None = None
    """Loss of the model as received on the task's check batch (LocalTask.check_batch)."""

    loss_generic: float | None = None
    """Next-token loss of the model as received on the packaged generic text (the fluency
    watch), where the assignment asked for it."""

    shrunk_batches: int = 0
    """Batches whose step the trust region scaled down (zorba_edge.engine.zo.trusted)."""

    readout_steps: tuple[tuple[int, float], ...] = ()
    """(k, sum of g) per pool index of the label readout's directions (block R), in ascending k."""

    readout_shrunk_batches: int = 0
    """Batches whose readout step its own trust region (hyper.readout_trust_radius) scaled down."""

    @property
    def steps_taken(self) -> int:
        return len(self.steps) if self.local_steps is None else self.local_steps

    def report(self, assignment: Assignment, idempotency_key: str) -> Report:
        """The report of this outcome for `assignment` (what a client sends, a simulator books)."""
        return Report(
            idempotency_key=idempotency_key,
            base_version=assignment.base_version,
            steps=self.steps,
            num_samples=self.num_samples,
            loss_mean=self.loss_mean,
            loss_last=self.loss_last,
            peak_memory_bytes=self.peak_memory_bytes,
            step_time_s=self.step_time_s,
            loss_check=self.loss_check,
            loss_generic=self.loss_generic,
            readout_steps=self.readout_steps,
        )

    @property
    def trained(self) -> bool:
        """Whether anything came of the round: ZO steps, or weights to upload."""
        return bool(self.steps) or self.upload is not None


def starting_table(table: CoefficientTable | None, run: RunInfo) -> CoefficientTable:
    """The table a trainer starts from: the one resumed from the client's state, which must
    have the run's shape, or (None) the run's table at version 0."""
    columns = run_table_columns(run)
    if table is None:
        return CoefficientTable(run.pool_size, columns)
    if (table.pool_size, table.num_blocks) != (run.pool_size, columns):
        raise SyncError(
            f"the saved table is {table.pool_size} x {table.num_blocks} but the run's is "
            f"{run.pool_size} x {columns}: delete the client state to start afresh"
        )
    return table


def run_table_columns(run: RunInfo) -> int:
    """The run's table columns: its blocks, and the label readout's when the run has one."""
    return table_columns(run.num_blocks, run.hyper.readout_directions)


def advance_table(table: CoefficientTable, deltas: Iterable[AlphaDelta]) -> list[AlphaIncrement]:
    """Apply published rounds to `table` in version order (skipping ones already applied);
    the increments applied, for the caller to move its held weights by."""
    applied: list[AlphaIncrement] = []
    for delta in sorted(deltas, key=lambda d: d.version):
        if delta.version <= table.version:
            continue
        if delta.version != table.version + 1:
            raise SyncError(
                f"delta for version {delta.version} cannot follow local version "
                f"{table.version}: catch up from /v1/state"
            )
        increments = [AlphaIncrement(k, b, v) for k, b, v in delta.entries()]
        table.apply(increments)
        applied.extend(increments)
    return applied


REFRESH_BLOCKS_PER_ROUND = 2
"""Stale frozen blocks rebuilt before one round, the stalest first."""


class LocalTrainer:
    """Holds the model for the current assignment and runs rounds on the local task."""

    def __init__(
        self,
        source: ModelSource,
        load_config: LoadConfig,
        run: RunInfo,
        task: LocalTask,
        *,
        table: CoefficientTable | None = None,
        refresh_every: int = 20,
    ) -> None:
        self.source = source
        self.load_config = load_config
        self.run = run
        self.task = task
        self.table = starting_table(table, run)
        self.refresh_every = refresh_every
        self.loaded: LoadedModel | None = None
        self._built: dict[int, int] = {}
        """Block -> the alpha version its frozen weights were built at."""
        self._probe = PeakMemoryProbe(load_config.device)
        self.readout: LabelReadout | None = None
        """The label readout attached to the model where the run measures one (block R)."""

    # ------------------------------------------------------------------ model state

    def _materialize(self) -> Callable[[int], dict[str, torch.Tensor]]:
        return block_materializer(self.source.block_state_dict, self.table, self.run.seed)

    def _held(self) -> BlockTensors:
        if self.loaded is None:
            return {}
        return {**{b: self.loaded.trainable_parameters(b) for b in self.loaded.assignment},
                **self._readout()}

    def _readout(self) -> dict[int, NamedTensors]:
        """Block R's tensors where the readout is held (every delta moves them), else none."""
        if self.readout is None:
            return {}
        return {readout_block(self.run.num_blocks): self.readout.tensors()}

    def _rebuild_all(self, progress: Progress | None = None) -> None:
        """Every block from base + alpha: after a catch-up from the whole table (each block
        replays its whole column, so `progress` counts the blocks)."""
        assert self.loaded is not None
        materialize = self._materialize()
        for block in tracked(range(self.run.num_blocks), self.run.num_blocks, progress):
            self.loaded.install_block(block, materialize(block), trainable=block in self.loaded.assignment)
        self._built = dict.fromkeys(range(self.run.num_blocks), self.table.version)

    def hold(self, blocks: Iterable[int], progress: Progress | None = None) -> LoadedModel:
        """Load the model (first time) or move it to a new assignment, and rebuild the
        stalest frozen blocks (at most REFRESH_BLOCKS_PER_ROUND). `progress` counts the
        first load's parts (load_model), the one wait here that takes minutes. `blocks` is
        checked here (AssignmentError) unless it comes checked (`Blocks`)."""
        blocks = check_assignment(blocks, self.run.num_blocks)
        version = self.table.version
        if self.loaded is None:
            self.loaded = load_model(self.source, blocks, self.load_config,
                                     materialize=self._materialize(), progress=progress)
            self._built = dict.fromkeys(range(self.run.num_blocks), version)
            self.readout = client_readout(self.loaded.model, self.run, self.task, self.table)
        elif set(blocks) != set(self.loaded.assignment):
            changed = set(blocks) ^ set(self.loaded.assignment)
            self.loaded.reassign(blocks, self._materialize())
            self._built.update(dict.fromkeys(changed, version))
        self._refresh_frozen(blocks)
        return self.loaded

    def _refresh_frozen(self, blocks: tuple[int, ...]) -> None:
        """Rebuild the stalest frozen blocks (outside `blocks`) from base + alpha."""
        assert self.loaded is not None
        version = self.table.version
        stale = sorted((built, block) for block, built in self._built.items()
                       if block not in blocks and version - built >= self.refresh_every)
        if stale:
            materialize = self._materialize()
            for _, block in stale[:REFRESH_BLOCKS_PER_ROUND]:
                self.loaded.install_block(block, materialize(block), trainable=False)
                self._built[block] = version
            release_freed_memory()

    # ------------------------------------------------------------------ sync

    def apply_deltas(self, deltas: Iterable[AlphaDelta], progress: Progress | None = None) -> None:
        """Apply published rounds in version order; ones already applied are skipped.
        `progress` counts the rounds."""
        ordered = sorted(deltas, key=lambda d: d.version)
        for delta in tracked(ordered, len(ordered), progress):
            # One delta at a time: a SyncError leaves the weights at the table's version.
            apply_increments_(self._held(), self.run.seed, advance_table(self.table, [delta]))

    def replace_table(self, state: AlphaState, progress: Progress | None = None) -> None:
        """Catch up from the whole table: rebuild every held block from base + alpha
        (`progress` counts the blocks)."""
        self.table = CoefficientTable(state.pool_size, state.num_blocks, state.matrix(), state.version)
        if self.loaded is not None:
            self._rebuild_all(progress)
            if self.readout is not None:
                rebuild_readout(self.readout, self.loaded.model, self.run, self.table)

    # ------------------------------------------------------------------ a round

    def train_round(self, assignment: Assignment, cancel: threading.Event,
                    on_step: StepGate | None = None) -> LocalRoundResult:
        """One round's local steps; the model is back at the global state when this returns."""
        if assignment.base_version != self.table.version:
            raise SyncError(
                f"round {assignment.round} trains on alpha version {assignment.base_version} "
                f"but this client is at {self.table.version}: sync first"
            )
        # The one check of the assignment's blocks: everything below trusts them.
        blocks = check_assignment(assignment.blocks, self.run.num_blocks)
        loaded = self.hold(blocks)
        # The peak of this assignment, not of the last one: moving from 30 blocks to 1, the
        # 29 blocks handed back counted in a peak taken across the move (measured: 996 MiB for
        # a round of one block that needs 887), and calibration then shrank the client.
        release_freed_memory()
        self._probe.reset()
        trained = {b: loaded.trainable_parameters(b) for b in loaded.assignment}
        outcome = run_local_steps(loaded.model, trained, self.task, assignment, self.run,
                                  self.load_config.device, cancel, on_step, readout=self.readout)
        return dataclasses.replace(outcome, peak_memory_bytes=self._probe.peak_bytes())


def run_local_steps(model: torch.nn.Module, blocks: BlockTensors, task: LocalTask,
                    assignment: Assignment, run: RunInfo, device: str | torch.device,
                    cancel: threading.Event | None = None,
                    on_step: StepGate | None = None, *,
                    snapshot_buffers: SnapshotBuffers | None = None,
                    release_memory: bool = True,
                    snapshot_dir: str | None = None,
                    readout: LabelReadout | None = None) -> LocalRoundResult:
    """A round's ZO steps on `blocks` (the assignment's blocks of `model`), then the exact
    revert: the one local training loop that real clients and the simulator both run.

    Each batch measures `hyper.directions` consecutive pool indices with the run's estimator
    (zorba_edge.engine.zo); every (k, g) moves theta by lr * g * z[k], which is what the
    server adds to alpha per scalar. `on_step(t, count)` is asked before the batch of steps
    t .. t + count - 1; returning False stops the round there (the simulator stops a virtual device at
    its deadline or when it drops out). The outcome's peak memory is left 0: only a real
    device measures one.

    The round-start copy the revert needs is spilled to an unlinked file in `snapshot_dir`
    (default: spill_directory()), so it costs no memory. A process that runs round after round
    on the same model and measures no memory (the simulator) passes `snapshot_buffers` to keep
    the copy in host buffers between rounds instead, and `release_memory=False` to skip
    handing freed pages back to the OS (which only keeps a device's measured footprint
    honest); neither changes a value.

    `readout`: the label readout attached to `model` (`ClientReadout`), where the round measures
    one (hyper.readout_directions > 0). Each batch's first forward records the head's inputs,
    and `readout_directions` directions on the rows are then scored from them and stepped
    (zorba_edge.engine.zo.readout_estimate), on pool indices taken from the assignment's in
    turn; their scalars are summed per pool index (aggregation sums a client's scalars per k
    anyway). The round-end revert covers the rows.
    """
    hyper = assignment.hyper
    n = hyper.directions
    config = ZOConfig.for_round(hyper.lr, hyper.mu, n, hyper.trust_radius, blocks,
                                run.max_abs_scalar)
    estimate = ESTIMATORS[hyper.estimator]
    steps: list[tuple[int, float]] = []
    losses: list[float] = []
    forwards = batches = shrunk = 0
    started = time.perf_counter()
    pool = assignment.pool_indices
    on_readout = ReadoutRound.of(readout, run, assignment) if readout is not None else None
    held = blocks if on_readout is None else {**blocks, on_readout.block: on_readout.readout.tensors()}
    snapshot: Snapshot = (SpilledSnapshot(held, snapshot_dir) if snapshot_buffers is None
                          else RoundSnapshot(held, snapshot_buffers))
    loss_check = loss_generic = None
    try:
        if pool and not (cancel is not None and cancel.is_set()):
            with torch.no_grad():
                check = task.check_batch(hyper.batch_size, hyper.seq_len).to(device)
                loss_check = float(task.loss_fn(model, check))
            forwards += 1
            if assignment.measure_generic:
                # The same model as the check loss, on text no task holds: len(text tokens) //
                # seq_len rows (zorba_edge/engine/fluency.py), at most a batch's a forward so
                # the round holds no more than the memory model counts.
                text = generic_batch(task.tokenizer, hyper.seq_len).to(device)
                loss_generic = generic_loss(model, text, max_rows=hyper.batch_size)
                forwards += -(-len(text) // hyper.batch_size)
            if release_memory:
                # glibc keeps the freed logits of these forwards in its heap, and the steps'
                # buffers, of other sizes, came on top of them: the round's peak was their sum
                # (measured: 226 MiB above the held model with one block, against 136 without
                # the text's forward). Handed back, the peak is the larger of the two.
                release_freed_memory()
        for t in range(0, len(pool), n):
            ks = pool[t:t + n]
            if (cancel is not None and cancel.is_set()) or (
                    on_step is not None and not on_step(t, len(ks))):
                break
            if len(ks) < MIN_DIRECTIONS.get(hyper.estimator, 1):
                break  # a short last batch the estimator cannot measure: left unreported
            batch = task.next_batch(hyper.batch_size, hyper.seq_len).to(device)
            if on_readout is None:
                result = estimate(model, blocks, task.loss_fn, batch, run.seed, ks, config)
            else:
                loss_fn, calls = record_first_forward(task.loss_fn, on_readout.readout)
                result = estimate(model, blocks, loss_fn, batch, run.seed, ks, config)
                on_readout.step(batches, calls, batch, run.seed)
            steps.extend(result.steps)
            losses.append(result.loss)
            forwards += result.forwards
            batches += 1
            shrunk += result.shrink < 1.0
    finally:
        try:
            snapshot.revert()
        finally:
            snapshot.close()
        # Give the round's freed buffers back to the OS: without it the quickstart's
        # measured peaks crept up ~5 MiB a round (glibc heap growth).
        if release_memory:
            release_freed_memory()
    elapsed = time.perf_counter() - started
    return LocalRoundResult(
        steps=tuple(steps),
        num_samples=batches * min(hyper.batch_size, len(task.examples)),
        loss_mean=statistics.fmean(losses) if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"),
        peak_memory_bytes=0,
        step_time_s=elapsed / len(steps) if steps else 0.0,
        cancelled=cancel is not None and cancel.is_set() and len(steps) < len(pool),
        forwards=forwards,
        # A model that gives no finite loss is as bad as a report can say.
        loss_check=_reportable(loss_check),
        loss_generic=_reportable(loss_generic),
        shrunk_batches=shrunk,
        readout_steps=() if on_readout is None else on_readout.scalars(),
        readout_shrunk_batches=0 if on_readout is None else on_readout.shrunk,
    )


@dataclass
class ReadoutRound:
    """One round's steps on the label readout (block R): which pool indices each batch's
    readout directions take, their step, and the scalars summed per pool index."""

    readout: LabelReadout
    block: int
    pool: tuple[int, ...]
    """The assignment's own readout pool indices, taken in turn and never twice; where it has
    none (a server from before them), the body's pool indices, cycled."""
    directions: int
    """Per batch: hyper.readout_directions, at most the pool's length (a batch's directions
    are distinct)."""
    config: ZOConfig
    own: bool = False
    """Whether `pool` is the readout's own list (each batch new directions, none after its end)."""
    sums: dict[int, float] = dataclasses.field(default_factory=dict)
    shrunk: int = 0
    """Batches whose readout step the readout's trust region scaled down."""

    @staticmethod
    def of(readout: LabelReadout, run: RunInfo, assignment: Assignment) -> ReadoutRound | None:
        """The round's readout steps, or None where the round measures no readout."""
        hyper, own = assignment.hyper, bool(assignment.readout_pool_indices)
        pool = assignment.readout_pool_indices if own else assignment.pool_indices
        if hyper.readout_directions <= 0 or not pool:
            return None
        block = readout_block(run.num_blocks)
        directions = min(hyper.readout_directions, len(pool))
        # The server adds readout_lr x g per scalar; the estimator moves the rows by
        # (lr' / n) sum g z, so lr' = readout_lr x n, as the body's (ZOConfig.for_round).
        config = ZOConfig.for_round(hyper.readout_lr, hyper.mu, directions, hyper.readout_trust_radius,
                                    {block: readout.tensors()}, run.max_abs_scalar)
        return ReadoutRound(readout, block, pool, directions, config, own=own)

    def pool_indices(self, batch: int) -> list[int]:
        """Batch t's readout directions: the pool's indices t*n .. t*n + n - 1; past the end of
        its own list none (the server sized it to the client's batches), of the body's cycling."""
        start = batch * self.directions
        if self.own:
            ks = self.pool[start:start + self.directions]
            return list(ks) if len(ks) == self.directions else []
        return [self.pool[(start + j) % len(self.pool)] for j in range(self.directions)]

    def step(self, batch_index: int, calls: list[HeadCall], batch: Any, run_seed: int) -> None:
        """Measure and step the batch's readout directions from its first forward's `calls`."""
        ks = self.pool_indices(batch_index)
        if not ks:
            return
        result = readout_estimate(self.readout, self.block, calls, batch, run_seed, ks, self.config)
        for k, g in result.steps:
            self.sums[k] = self.sums.get(k, 0.0) + g
        self.shrunk += result.shrink < 1.0

    def scalars(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted(self.sums.items()))


def _reportable(loss: float | None) -> float | None:
    """A measured loss as the wire takes it: a model that gives no finite loss is as bad as a
    report can say."""
    return None if loss is None else (min(loss, MAX_LOSS) if math.isfinite(loss) else MAX_LOSS)
