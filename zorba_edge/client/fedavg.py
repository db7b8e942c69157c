"""The fedavg baseline's client trainer: first-order AdamW on every block (issue 5).

What ZorBA is measured against, run through the same daemon, data, model loading and
accounting: each round the client installs the server's averaged block weights (unless it
already holds them), takes the round's local steps with backpropagation and AdamW (a fresh
optimizer each round, as plain FedAvg does), and hands back its trained block weights for
upload. Embeddings, final norm and head stay frozen, as in every mode, so all modes train
the same parameters.

Memory is measured as honestly as for ZorBA: the round's peak spans the downloaded buffer,
the backward pass, AdamW's two moments and the serialised upload. Weights are copied from
the download buffer into the parameters tensor by tensor (no second full copy).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import struct
import threading
import time
from collections.abc import Iterable, Sequence

import torch
from safetensors.torch import save

from zorba_common.messages import AlphaDelta, AlphaState, Assignment, RunInfo
from zorba_common.weight_files import tensor_key
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.memory_probe import PeakMemoryProbe
from zorba_edge.client.trainer import LocalRoundResult, StepGate, SyncError, advance_table, check_saved_table
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.loading import LoadConfig, LoadedModel, load_model, release_freed_memory
from zorba_edge.model.progress import Progress
from zorba_edge.model.sources import ModelSource

_SAFETENSORS_DTYPES = {"F32": torch.float32}
FORWARDS_PER_STEP = 3
"""A first-order step in forward-pass equivalents: the forward, and the backward at about twice
a forward's work (activation and weight gradients); AdamW's update, a few element-wise passes
over the parameters, is small beside them and not counted. A ZO step is its forwards alone."""


class FedAvgTrainer:
    """Holds every block trainable in the training precision; rounds are AdamW steps."""

    def __init__(self, source: ModelSource, load_config: LoadConfig, run: RunInfo,
                 task: LocalTask, *, table: CoefficientTable | None = None) -> None:
        check_saved_table(table, run)
        self.source = source
        self.load_config = load_config
        self.run = run
        self.task = task
        self.table = table or CoefficientTable(run.pool_size, run.num_blocks)
        """Only its version matters here: fedavg rounds publish empty alpha deltas."""
        self.loaded: LoadedModel | None = None
        self.weights_version = 0
        """The version whose global weights the model holds; -1 after local training."""
        self._probe = PeakMemoryProbe(load_config.device)
        self._probe_armed = False

    def hold(self, progress: Progress | None = None) -> LoadedModel:
        """The model, loaded the first time (`progress` counts its parts, as load_model's)."""
        if self.loaded is None:
            self.loaded = load_model(self.source, range(self.run.num_blocks), self.load_config,
                                     progress=progress)
        return self.loaded

    # ------------------------------------------------------------------ sync
    # Only the table's version moves here (no weights), which is instant: nothing to report.

    def apply_deltas(self, deltas: Iterable[AlphaDelta], progress: Progress | None = None) -> None:
        advance_table(self.table, deltas)

    def replace_table(self, state: AlphaState, progress: Progress | None = None) -> None:
        self.table = CoefficientTable(state.pool_size, state.num_blocks, state.matrix(), state.version)

    def weights_needed(self, assignment: Assignment) -> bool:
        """Whether the round's base weights must be downloaded first (version 0 is the base)."""
        return assignment.base_version > 0 and self.weights_version != assignment.base_version

    @torch.no_grad()
    def install_weights(self, buffer: bytearray, version: int) -> None:
        """Copy a downloaded weight file into the blocks, tensor by tensor, in place."""
        # The round's peak starts here: the download buffer is already resident.
        self._probe.reset()
        self._probe_armed = True
        loaded = self.hold()
        params = self._parameters(loaded)
        (length,) = struct.unpack_from("<Q", buffer, 0)
        header = json.loads(bytes(buffer[8:8 + length]))
        header.pop("__metadata__", None)
        if set(header) != set(params):
            missing = sorted(set(params) - set(header))[:3]
            raise SyncError(f"the server's weights for version {version} do not match this model "
                            f"(missing e.g. {missing}): is it the run's base model?")
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            start, end = entry["data_offsets"]
            if dtype is None or end - start != params[name].numel() * 4:
                raise SyncError(f"tensor {name} of version {version} is {entry['dtype']} "
                                f"{entry['shape']}: expected float32 {list(params[name].shape)}")
            src = torch.frombuffer(buffer, dtype=dtype, count=params[name].numel(),
                                   offset=8 + length + start)
            params[name].copy_(src.view(params[name].shape))
        self.weights_version = version

    def _parameters(self, loaded: LoadedModel) -> dict[str, torch.nn.Parameter]:
        return {tensor_key(b, name): p for b in range(self.run.num_blocks)
                for name, p in loaded.trainable_parameters(b)}

    @torch.no_grad()
    def _restore_base(self, loaded: LoadedModel) -> None:
        for block in range(self.run.num_blocks):
            loaded.install_block(block, self.source.block_state_dict(block), trainable=True)
        self.weights_version = 0

    # ------------------------------------------------------------------ a round

    def train_round(self, assignment: Assignment, cancel: threading.Event,
                    on_step: StepGate | None = None) -> LocalRoundResult:
        if assignment.base_version != self.table.version:
            raise SyncError(f"round {assignment.round} trains on version {assignment.base_version} "
                            f"but this client is at {self.table.version}: sync first")
        if not self._probe_armed:
            self._probe.reset()
        self._probe_armed = False
        loaded = self.hold()
        if assignment.base_version == 0 and self.weights_version != 0:
            self._restore_base(loaded)  # an earlier round trained locally but never applied
        if self.weights_version != assignment.base_version:
            raise SyncError(f"round {assignment.round} starts from the weights of version "
                            f"{assignment.base_version}; this client holds "
                            f"{self.weights_version}: download them first")
        previous, self.weights_version = self.weights_version, -1  # local weights from step 1 on
        outcome = run_adamw_steps(loaded.model, list(self._parameters(loaded).values()), self.task,
                                  assignment, self.load_config.device, cancel, on_step)
        if not outcome.local_steps:
            self.weights_version = previous  # no step taken: the model still holds them
        upload = save({name: p.detach().cpu().contiguous()
                       for name, p in self._parameters(loaded).items()}) if outcome.local_steps else None
        peak = self._probe.peak_bytes()
        release_freed_memory()
        return dataclasses.replace(outcome, peak_memory_bytes=peak, upload=upload)


def run_adamw_steps(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], task: LocalTask,
                    assignment: Assignment, device: str | torch.device,
                    cancel: threading.Event | None = None,
                    on_step: StepGate | None = None) -> LocalRoundResult:
    """A fedavg round's local training on `params` (every block's), left trained in place: the
    one first-order loop that real clients (`FedAvgTrainer`) and the simulator both run.

    One AdamW step per pool index of the assignment (the indices only count the steps: fedavg
    reports none), each on the task's next batch, with a fresh optimizer, as plain FedAvg
    does. `on_step(t, 1)` is asked before step t; False ends the round there. Forward passes are
    counted as FORWARDS_PER_STEP per step. The outcome carries no upload and no peak: the
    caller serialises the weights and measures memory.
    """
    hyper = assignment.hyper
    losses: list[float] = []
    started = time.perf_counter()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=hyper.lr)
    try:
        for t, _ in enumerate(assignment.pool_indices):
            if (cancel is not None and cancel.is_set()) or (
                    on_step is not None and not on_step(t, 1)):
                break
            batch = task.next_batch(hyper.batch_size, hyper.seq_len).to(device)
            loss = task.loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        del optimizer
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    elapsed = time.perf_counter() - started
    return LocalRoundResult(
        steps=(),
        num_samples=len(losses) * min(hyper.batch_size, len(task.examples)),
        loss_mean=statistics.fmean(losses) if losses else float("nan"),
        loss_last=losses[-1] if losses else float("nan"),
        peak_memory_bytes=0,
        step_time_s=elapsed / len(losses) if losses else 0.0,
        cancelled=cancel is not None and cancel.is_set() and len(losses) < len(assignment.pool_indices),
        local_steps=len(losses),
        forwards=FORWARDS_PER_STEP * len(losses),
    )
