"""fedavg's virtual clients: first-order AdamW on every block, weights exchanged both ways.

Per round, each client in turn installs the round's global block weights into the one model,
runs the real fedavg client's local loop (`zorba_edge.client.modes.fedavg_training.run_adamw_steps`), and,
when its report will reach the server, leaves a copy of its trained weights (float32, what
it would upload). At the close the server's own average (`zorba_server.weight_store.
weighted_average`, the clients' registered sample counts as weights, in client-id order)
becomes the model's new global weights; a round that does not apply leaves them as they were.

Costs: the uploads of one round are held in memory (reporting clients x the blocks' fp32
weights), and each client's turn copies the global weights into the model. A client
downloads the weights file unless it still holds the round's version, and uploads it after
training (one size both ways: every block in float32, safetensors, as the real exchange).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from zorba_common.messages import Assignment, RunInfo
from zorba_common.weight_files import tensor_key
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.modes.fedavg_training import run_adamw_steps
from zorba_edge.client.trainer import LocalRoundResult, first_steps
from zorba_edge.engine.directions import NamedTensors
from zorba_edge.model.loading import LoadedModel
from zorba_server.engine import RoundClosure, RoundEngine
from zorba_server.weight_store import weighted_average

Weights = dict[str, np.ndarray]
"""tensor_key(block, name) -> float32 array: every block's trainable parameters."""


class FedAvgClients:
    def __init__(self, loaded: LoadedModel, device: str) -> None:
        self.model = loaded.model
        self.device = device
        self.params = {tensor_key(b, name): p for b in range(loaded.num_blocks)
                       for name, p in loaded.trainable_parameters(b)}
        self.held: dict[str, int] = {}
        """Client -> the version of global weights it holds (0, the base model, until it
        trains; -1 after training: its own local weights, as FedAvgTrainer.weights_version)."""
        self._global: Weights | None = None
        """The open round's global weights."""
        self._uploads: dict[str, Weights] = {}
        self._model_is_global = True
        self._file_bytes: int | None = None

    # ------------------------------------------------------------------ the weights

    def weights(self) -> Weights:
        """A copy of the model's block weights."""
        return {name: p.detach().to("cpu", copy=True).numpy() for name, p in self.params.items()}

    @torch.no_grad()
    def install(self, weights: Mapping[str, np.ndarray]) -> None:
        for name, p in self.params.items():
            p.copy_(torch.from_numpy(weights[name]))

    def file_bytes(self) -> int:
        """The size of a weights file (the upload's safetensors; the download is the same)."""
        if self._file_bytes is None:
            self._file_bytes = len(save({n: p.detach().cpu().contiguous()
                                         for n, p in self.params.items()}))
        return self._file_bytes

    # ------------------------------------------------------------------ ClientTraining

    def probe_step_s(self, task: LocalTask, engine: RoundEngine, info: RunInfo) -> float:
        """One AdamW step (its fresh optimizer's set-up included, as every round pays it),
        then the weights put back."""
        before = self.weights()
        probe = Assignment(round=0, base_version=engine.version,
                           blocks=tuple(range(engine.footprint.num_blocks if engine.footprint else 0)),
                           pool_indices=(0,), hyper=engine.hyper(), deadline_in_s=0.0,
                           deadline_unix=0.0)
        try:
            return run_adamw_steps(self.model, list(self.params.values()), task, probe,
                                   self.device).step_time_s
        finally:
            self.install(before)

    def held_beside_blocks(self) -> dict[int, NamedTensors]:
        return {}  # fedavg trains the blocks' weights alone

    def begin_round(self) -> None:
        self._global = self.weights()
        self._uploads = {}
        self._model_is_global = True

    def weights_down_bytes(self, client_id: str, assignment: Assignment) -> int:
        """As FedAvgTrainer.weights_needed: version 0 is the base every client loads itself."""
        needed = assignment.base_version > 0 and self.held.get(client_id, 0) != assignment.base_version
        return self.file_bytes() if needed else 0

    def weights_up_bytes(self) -> int:
        return self.file_bytes()

    def train(self, client_id: str, task: LocalTask, assignment: Assignment, info: RunInfo,
              take: int, reports: bool) -> LocalRoundResult:
        assert self._global is not None, "begin_round first"
        if not self._model_is_global:
            self.install(self._global)  # every client starts from the round's global weights
        outcome = run_adamw_steps(self.model, list(self.params.values()), task, assignment,
                                  self.device, on_step=first_steps(take))
        trained = bool(outcome.local_steps)
        self._model_is_global = not trained
        self.held[client_id] = -1 if trained else assignment.base_version
        if trained and reports:
            self._uploads[client_id] = self.weights()
        return outcome

    def close(self, closure: RoundClosure, engine: RoundEngine) -> None:
        """As the server's close (zorba_server/weight_rounds.py): the average of the reporting
        clients' uploads when the round publishes a version, otherwise nothing changes."""
        assert self._global is not None
        if closure.delta is not None:
            ids = closure.client_ids
            weights = engine.sample_weights(ids)
            self.install(weighted_average(self._global.keys(),
                                          [self._uploads[cid].__getitem__ for cid in ids],
                                          [weights[cid] for cid in ids]))
        elif not self._model_is_global:
            self.install(self._global)
        self._global, self._uploads, self._model_is_global = None, {}, True

    def version_state(self, engine: RoundEngine) -> Weights:
        """The version's weights themselves (the table stays zero in fedavg)."""
        return self.weights()

    def move_to_version_(self, current: Weights, target: Weights) -> None:
        self.install(target)

    def state(self) -> dict[str, int]:
        return dict(self.held)

    def restore(self, state: Any) -> None:
        self.held = dict(state or {})
