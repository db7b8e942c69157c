"""The RMS of each block's base weights: what the server's drift bound is relative to.

The drift of block b is |theta_b - theta0_b| / |theta0_b| = sqrt(sum_k alpha[k,b]^2) / rms_b
(zorba_server/drift.py), where rms_b is the RMS over every parameter a direction perturbs,
i.e. every tensor of the block's state dict, in fp32 as the model source gives it. Only a
holder of the weights can compute it; a client sends it in its profile (`DeviceProfile.base_rms`).
It reads every block anyway when it loads the model for its timing probe, so `BlockRMS` takes
the values off that load; without a probe (`--step-time`), `read_base_rms` reads each block once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from zorba_edge.model.loading import Materialize
from zorba_edge.model.sources import ModelSource, StateDict


def tensors_rms(tensors: Iterable[torch.Tensor]) -> float:
    """RMS over every entry of `tensors`, accumulated in float64."""
    squares, count = 0.0, 0
    for t in tensors:
        squares += float(t.detach().to(torch.float64).square().sum())
        count += t.numel()
    return math.sqrt(squares / max(1, count))


class BlockRMS:
    """Records each block's base RMS as a load reads its weights."""

    def __init__(self) -> None:
        self._rms: dict[int, float] = {}

    def reading(self, materialize: Materialize) -> Materialize:
        """`materialize`, recording the RMS of every block it gives (before the loader takes
        ownership of the tensors)."""
        def read(block: int) -> StateDict:
            state = materialize(block)
            self._rms[block] = tensors_rms(state.values())
            return state

        return read

    def values(self, num_blocks: int) -> tuple[float, ...] | None:
        """One RMS per block, or None unless every block was read."""
        if set(self._rms) != set(range(num_blocks)):
            return None
        return tuple(self._rms[b] for b in range(num_blocks))


def read_base_rms(source: ModelSource) -> tuple[float, ...]:
    """Each block's base RMS, reading the blocks one at a time (one block in memory at once)."""
    return tuple(tensors_rms(source.block_state_dict(b).values())
                 for b in range(int(source.config.num_hidden_layers)))
