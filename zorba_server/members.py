"""Who may join a run, and what the engine knows of each member (pure).

One admission rule: a device joins when it runs the run's model and its memory budget holds
at least the cheapest block under the shared memory model (`zorba_common.memory_model`,
the same model the client's own check and the scheduler use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zorba_common.memory_model import LinearMemoryModel, ModelFootprint, linear_memory_model
from zorba_common.schema import DeviceProfile
from zorba_server import errors
from zorba_server.config import RunConfig

LEFT = -math.inf
"""`Member.last_seen` of a client that left (POST /v1/leave): seen too long ago to be active,
however long the membership timeout; its next request makes it active again."""


@dataclass
class Member:
    """What the engine knows of one registered client."""

    client_id: str
    profile: DeviceProfile
    registered_at: float
    calibration: float
    last_seen: float
    step_time_s: float
    rounds_reported: int = 0
    last_loss: float | None = None
    last_peak_bytes: int = 0
    guard_outlier_rounds: int = 0
    """Rounds in which the loss guard found this client's check loss implausible next to the
    others' (from QUARANTINE_ROUNDS on it ignores them; counted afresh after a restart)."""

    @classmethod
    def joining(cls, client_id: str, profile: DeviceProfile, now: float) -> Member:
        """A client registering now: the memory model as it is (calibration 1) and the step
        time it measured itself, until its reports say otherwise."""
        return cls(client_id, profile, now, 1.0, now, profile.step_time_s)

    @property
    def left(self) -> bool:
        return self.last_seen == LEFT


def memory_model(run: RunConfig, profile: DeviceProfile, calibration: float) -> LinearMemoryModel:
    """The device's memory model at this run's batch and sequence length."""
    settings = profile.memory.settings(run.batch_size, run.seq_len, calibration)
    return linear_memory_model(profile.footprint, settings)


def check_budget(run: RunConfig, profile: DeviceProfile) -> None:
    """Refuse a device that could never hold a block."""
    model = memory_model(run, profile, 1.0)
    if model.blocks_within(profile.memory_budget_bytes) < 1:
        need = model.fixed_bytes + min(model.block_bytes)
        raise errors.unprocessable(
            "budget_too_small",
            f"training even the cheapest block needs {need / 2**20:.0f} MiB with this run's "
            f"batch_size={run.batch_size}, seq_len={run.seq_len}; the device offers "
            f"{profile.memory_budget_bytes / 2**20:.0f} MiB: free memory or hold frozen blocks "
            "in a smaller precision",
        )


def check_same_model(profile: DeviceProfile, fingerprint: str, footprint: ModelFootprint) -> None:
    """Refuse a device that runs another model than the run pinned."""
    if profile.model_fingerprint != fingerprint:
        raise errors.conflict(
            "model_mismatch",
            f"this run trains model {fingerprint!r}, the client loaded "
            f"{profile.model_fingerprint!r}: load the run's base model",
        )
    if profile.footprint != footprint:
        diff = [f for f in ("num_layers", "hidden_size", "vocab_size", "intermediate_size",
                            "embed_head_params", "block_params", "quantizable_block_params")
                if getattr(profile.footprint, f) != getattr(footprint, f)]
        raise errors.conflict(
            "model_mismatch",
            f"the client's model footprint differs from the run's in {', '.join(diff)}: "
            "same fingerprint but another architecture; load the run's base model",
        )
