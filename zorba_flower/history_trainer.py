"""A Flower node's model as its run's history made it: the weights zorba_sim's one model has.

zorba_sim (like an always-online daemon's trainable blocks) loads base at version 0 and adds
each published round's increments in place (`apply_increments_`), round after round. A Flower
node may be served by a fresh process (Deployment Engine) or by a Ray actor that last served
another node at another version (Simulation Engine), so `HistoryTrainer` holds every block at

    W_b(v) = base_b, then the increments of versions 1..v applied in place, in version order

whichever process it runs in. A process already at version u applies versions u+1..v in place
to every block it holds at the training precision (the assigned ones, and the frozen ones too
when they are held in it: `client.frozen-dtype` fp32); a block it must build (the first load,
a block held in a narrower precision that becomes trainable, a narrow frozen block behind the
version) is replayed from base through the whole history (`replay_block_materializer`).
Replaying and following perform the same fp32 operations in the same order, so W_b(v) is one
set of bits: a function of the history alone, the same in every process and in zorba_sim.

A frozen block held narrower than the training precision (bf16, nf4, ...) cannot follow in
place: it is W_b(v) cast or quantised, rebuilt by replay whenever the version moved, so its
bits too depend on the history alone (not bit for bit zorba_sim's, which holds every block in
fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from zorba_common.messages import AlphaDelta, AlphaState, RunInfo
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.trainer import LocalTrainer, SyncError, advance_table, run_table_columns
from zorba_edge.engine.coefficients import (
    AlphaIncrement,
    CoefficientTable,
    apply_increments_,
    replay_block_materializer,
)
from zorba_edge.engine.directions import BlockTensors
from zorba_edge.model.loading import LoadConfig, release_freed_memory
from zorba_edge.model.progress import Progress
from zorba_edge.model.sources import ModelSource


def check_history(history: Sequence[AlphaDelta]) -> None:
    """A run's history is every published delta, versions 1..v in order, none missing."""
    for i, delta in enumerate(history):
        if delta.version != i + 1:
            raise SyncError(
                f"the history's delta {i} has version {delta.version}, expected {i + 1}: a TRAIN "
                "message carries every delta the run published, from version 1 on; run the same "
                "zorba-edge version in the server app and on the nodes")


class HistoryTrainer(LocalTrainer):
    """A `LocalTrainer` whose weights follow the run's whole history in place (`follow`)."""

    def __init__(self, source: ModelSource, load_config: LoadConfig, run: RunInfo,
                 task: LocalTask) -> None:
        super().__init__(source, load_config, run, task)
        self.history: list[AlphaDelta] = []
        """The deltas this process's weights went through, versions 1..table.version."""
        self._rounds: list[list[AlphaIncrement]] = []
        """The same, as increments (what a replay applies)."""

    # ------------------------------------------------------------------ sync

    def follow(self, history: Sequence[AlphaDelta]) -> int:
        """Bring the table and the weights to the end of `history` (every delta the run
        published, versions 1..v); returns how many rounds were applied in place."""
        check_history(history)
        known = len(self.history)
        if known > len(history) or list(history[:known]) != self.history:
            # Not this process's past (a server app resumed from a checkpoint older than a
            # round this worker followed): weights cannot move back exactly, so start over.
            self._start_over()
            known = 0
        for delta in history[known:]:
            increments = advance_table(self.table, [delta])
            self.history.append(delta)
            self._rounds.append(increments)
            if self.loaded is not None:
                apply_increments_(self._exact_blocks(), self.run.seed, increments)
        return len(history) - known

    def _start_over(self) -> None:
        self.loaded = None
        self.table = CoefficientTable(self.run.pool_size, run_table_columns(self.run))
        self.readout = None
        self.history, self._rounds, self._built = [], [], {}
        release_freed_memory()

    def _exact_blocks(self) -> BlockTensors:
        """Every block held at the training precision, trainable or frozen."""
        loaded = self.loaded
        assert loaded is not None
        return {**{b: loaded.exact_parameters(b) for b in range(loaded.num_blocks) if loaded.exact(b)},
                **self._readout()}

    def apply_deltas(self, deltas: Iterable[AlphaDelta], progress: Progress | None = None) -> None:
        raise SyncError("a HistoryTrainer moves by follow(history), the run's whole history")

    def replace_table(self, state: AlphaState, progress: Progress | None = None) -> None:
        raise SyncError("a HistoryTrainer is built from the run's history (follow), not a table")

    # ------------------------------------------------------------------ building blocks

    def _materialize(self) -> Callable[[int], dict[str, torch.Tensor]]:
        """W_b(v): a copy of the block where it is held at the training precision (it
        followed every round in place), else replayed from base through the history."""
        replay = replay_block_materializer(self.source.block_state_dict, self._rounds, self.run.seed)
        loaded = self.loaded

        def materialize(block: int) -> dict[str, torch.Tensor]:
            if loaded is not None and loaded.exact(block):
                return {name: p.detach().clone() for name, p in loaded.exact_parameters(block)}
            return replay(block)

        return materialize

    def _refresh_frozen(self, blocks: tuple[int, ...]) -> None:
        """Frozen blocks held narrower than the training precision cannot follow in place:
        each is rebuilt at the current version whenever it is behind."""
        loaded = self.loaded
        assert loaded is not None
        version = self.table.version
        behind = [b for b in range(loaded.num_blocks)
                  if not loaded.exact(b) and self._built.get(b) != version]
        if behind:
            materialize = self._materialize()
            for block in behind:
                loaded.install_block(block, materialize(block), trainable=False)
                self._built[block] = version
            release_freed_memory()
