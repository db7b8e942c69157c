"""What the engine knows of each member, and whether its device can train in this run (pure):
`Member`, the admission rule, and the round engine's `Membership` part (who is active, what
each member weighs).

(Who may *register*, with the run's secret and a bearer token, is enrolment.py.)

One admission rule: a device joins when it runs the run's model and the usable part of its
memory budget (all but run.memory_headroom) holds at least the cheapest block under the shared
memory model (`zorba_common.memory_model`: `LinearMemoryModel.admits`, the same rule the
client's own check asks and the same budget the scheduler plans with).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from zorba_common.memory_model import LinearMemoryModel, ModelFootprint, linear_memory_model
from zorba_common.messages import DeviceProfile
from zorba_server import drift_budget, errors
from zorba_server.base_rms import agreed
from zorba_server.config import RunConfig
from zorba_server.engine_state import EngineState

MIB = 2**20
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
    others' (from QUARANTINE_ROUNDS on it ignores them; stored with each round's close, so a
    restarted server goes on counting)."""

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
    """Refuse a device that no round could use: the admission rule the scheduler plans by
    (`LinearMemoryModel.admits`: the usable part of the budget holds a block), with the
    budget it would need."""
    model = memory_model(run, profile, 1.0)
    if not model.admits(profile.memory_budget_bytes, run.memory_headroom):
        need = model.fixed_bytes + min(model.block_bytes)
        raise errors.unprocessable(
            "budget_too_small",
            f"training even the cheapest block needs {need / MIB:.0f} MiB with this run's "
            f"batch_size={run.batch_size}, seq_len={run.seq_len}, and the scheduler fills at most "
            f"{1 - run.memory_headroom:.0%} of a budget; the device offers "
            f"{profile.memory_budget_bytes / MIB:.0f} MiB: give it --memory-budget "
            f"{math.ceil(model.budget_needed(run.memory_headroom) / MIB)}MiB or more (if it has "
            "the memory), free memory, or hold frozen blocks in a smaller precision",
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


class Membership(EngineState):
    """The round engine's members: who is admitted, who is active, what each weighs."""

    def memory_model(self, profile: DeviceProfile, calibration: float) -> LinearMemoryModel:
        return memory_model(self.config.run, profile, calibration)

    def check_registration(self, profile: DeviceProfile) -> None:
        """Refuse a device that runs another model, or that could never hold a block."""
        if self.fingerprint is not None:
            assert self.footprint is not None
            check_same_model(profile, self.fingerprint, self.footprint)
        if self.mode.enforces_budget:  # fedavg: its peaks over the budget are the finding
            check_budget(self.config.run, profile)

    def add_member(self, member: Member) -> None:
        """Admit a member; a profile with base RMS values takes part in choosing the ones the
        drift bound uses (base_rms.py: see `base_rms_ignored` for the clients left out)."""
        self.members[member.client_id] = member
        if member.profile.base_rms is not None:
            chosen = agreed([(m.client_id, m.profile.base_rms) for m in self.members.values()
                             if m.profile.base_rms is not None])
            self.base_rms, self.base_rms_ignored = chosen.rms, chosen.ignored
        if member.profile.fluency_curvature is not None:
            curvature = drift_budget.agreed([
                (m.client_id, m.profile.fluency_curvature) for m in self.members.values()
                if m.profile.fluency_curvature is not None])
            self.fluency_curvature, self.curvature_ignored = curvature.curvature, curvature.ignored
        if member.profile.task_probe is not None:
            self.step_from_probes()

    def drop_member(self, client_id: str) -> None:
        """Forget a member; its assignment in an open round stays, unreported."""
        self.members.pop(client_id, None)

    def mark_left(self, member: Member) -> None:
        """The client stopped: not active (the next schedule leaves it out without waiting for
        its membership timeout, and an open round does not wait for its report)."""
        member.last_seen = LEFT

    def mark_seen(self, member: Member, now: float) -> bool:
        """The client made a request: active again. True when it had left (it is back)."""
        returned = member.left
        member.last_seen = now
        return returned

    def active_members(self, now: float) -> list[Member]:
        horizon = now - self.config.run.membership_timeout_s
        return [m for m in self.members.values() if m.last_seen >= horizon]

    def sample_weights(self, client_ids: Iterable[str]) -> dict[str, float]:
        return {cid: self._sample_weight(cid) for cid in client_ids}

    def _sample_weight(self, client_id: str) -> float:
        member = self.members.get(client_id)
        return float(member.profile.num_samples) if member is not None else 0.0

