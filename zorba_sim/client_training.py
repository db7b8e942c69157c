"""How the simulator's virtual clients train in a mode, and how a closed round moves the model.

`Simulation` runs every round the same way (plan, per client: download, train, report; close)
and leaves to a `ClientTraining` what differs between the zeroth-order modes and fedavg: the
local loop, the bytes beyond the messages, what a closed round does to the one model, and what
a version is to the comparison harness. `ZOClients` is the zeroth-order one (zorba,
zorba-uniform, fedzo-full, central MeZO); fedavg's is zorba_sim/fedavg_clients.py.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from zorba_common.messages import Assignment, RunInfo
from zorba_common.readout import readout_block
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.trainer import LocalRoundResult, StepGate, first_steps, run_local_steps
from zorba_edge.engine.coefficients import AlphaIncrement, apply_increments_
from zorba_edge.engine.directions import BlockTensors, NamedTensors
from zorba_edge.engine.snapshot import SnapshotBuffers
from zorba_edge.model.loading import LoadedModel
from zorba_edge.model.readout import LabelReadout
from zorba_server.engine import RoundClosure, RoundEngine


class ClientTraining(Protocol):
    def probe_step_s(self, task: LocalTask, engine: RoundEngine, info: RunInfo) -> float:
        """Seconds of one local step on this machine, every block held; the model is left as
        it was."""

    def begin_round(self) -> None:
        """A round opens: the model holds the round's global state."""

    def held_beside_blocks(self) -> dict[int, NamedTensors]:
        """Tensors every client holds beside the model's blocks, by block index: the label
        readout's rows (block R) where the run has one; what a checkpoint keeps with them."""

    def weights_down_bytes(self, client_id: str, assignment: Assignment) -> int:
        """Bytes the client downloads besides the NextRound message."""

    def weights_up_bytes(self) -> int:
        """Bytes a reporting client uploads besides its report."""

    def train(self, client_id: str, task: LocalTask, assignment: Assignment, info: RunInfo,
              take: int, reports: bool) -> LocalRoundResult:
        """The client's first `take` local steps from the round's global state (`reports`: its
        report will reach the server)."""

    def close(self, closure: RoundClosure, engine: RoundEngine) -> None:
        """The round closed (already applied to `engine`): leave the model at the new global
        state."""

    def version_state(self, engine: RoundEngine) -> Any:
        """What brings the model back to the current version later (`move_to_version_`)."""

    def move_to_version_(self, current: Any, target: Any) -> None:
        """Move the model from one kept `version_state` to another."""

    def state(self) -> Any:
        """What a checkpoint keeps between rounds (picklable)."""

    def restore(self, state: Any) -> None: ...


class ZOClients:
    """Zeroth-order clients: each perturbs only its assigned blocks and reverts them
    (`run_local_steps`); a closed round's increments move the model exactly as a client's
    sync does. Nothing travels but the messages.

    Every client snapshots into the same host buffers (one copy of the blocks, kept for the
    whole run) and none hands freed memory back to the OS: a real client's per-round
    allocation and heap trim keep its measured footprint small, and no virtual device
    measures one; neither changes a value."""

    def __init__(self, loaded: LoadedModel, run_seed: int, device: str,
                 readout: LabelReadout | None = None) -> None:
        """`readout`: the label readout attached to the model where the run measures one
        (zorba_edge.client.readout_setup.client_readout): every client holds it, block R."""
        self.loaded, self.run_seed, self.device = loaded, run_seed, device
        self.readout = readout
        self.snapshot_buffers = SnapshotBuffers()

    def _run(self, blocks: BlockTensors, task: LocalTask, assignment: Assignment, info: RunInfo,
             on_step: StepGate | None = None) -> LocalRoundResult:
        return run_local_steps(self.loaded.model, blocks, task, assignment, info, self.device,
                               on_step=on_step, snapshot_buffers=self.snapshot_buffers,
                               release_memory=False, readout=self.readout)

    def blocks(self) -> BlockTensors:
        """The model's blocks, and the readout's rows as block R where it is held: what a
        closed round's increments move."""
        return {**self.body(), **self.held_beside_blocks()}

    def body(self) -> dict[int, NamedTensors]:
        return {b: self.loaded.trainable_parameters(b) for b in range(self.loaded.num_blocks)}

    def held_beside_blocks(self) -> dict[int, NamedTensors]:
        if self.readout is None:
            return {}
        return {readout_block(self.loaded.num_blocks): self.readout.tensors()}

    def probe_step_s(self, task: LocalTask, engine: RoundEngine, info: RunInfo) -> float:
        hyper = engine.hyper()  # one batch: every estimator measures its directions
        probe = Assignment(round=0, base_version=engine.version,
                           blocks=tuple(range(self.loaded.num_blocks)),
                           pool_indices=tuple(range(hyper.directions)),
                           hyper=hyper, deadline_in_s=0.0, deadline_unix=0.0)
        return self._run(self.body(), task, probe, info).step_time_s

    def begin_round(self) -> None:
        pass

    def weights_down_bytes(self, client_id: str, assignment: Assignment) -> int:
        return 0

    def weights_up_bytes(self) -> int:
        return 0

    def train(self, client_id: str, task: LocalTask, assignment: Assignment, info: RunInfo,
              take: int, reports: bool) -> LocalRoundResult:
        blocks = self.body()
        return self._run({b: blocks[b] for b in assignment.blocks}, task, assignment, info,
                         first_steps(take))

    def close(self, closure: RoundClosure, engine: RoundEngine) -> None:
        if closure.delta is not None:
            apply_increments_(self.blocks(), self.run_seed,
                              [AlphaIncrement(k, b, v) for k, b, v in closure.delta.entries()])

    def version_state(self, engine: RoundEngine) -> np.ndarray:
        assert engine.alpha is not None
        return engine.alpha.copy()

    def move_to_version_(self, current: np.ndarray, target: np.ndarray) -> None:
        """Along the coefficient table: apply target - current (exact up to fp32 rounding)."""
        diff = target - current
        ks, bs = np.nonzero(diff)
        apply_increments_(self.blocks(), self.run_seed,
                          [AlphaIncrement(int(k), int(b), float(diff[k, b]))
                           for k, b in zip(ks, bs, strict=True)])

    def state(self) -> None:
        return None

    def restore(self, state: Any) -> None:
        pass
