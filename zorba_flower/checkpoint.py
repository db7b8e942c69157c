"""The Flower server app's durable state: one file holding the round engine's state.

A SuperLink restart fails the Flower run and nothing in Flower resumes it, so the server app
writes the engine's state (alpha, version, round counter, members, every delta the run
published, the rounds so far and the open round's plan) after every change of round and a new run started with
the same checkpoint path continues from it. The file is replaced atomically (write, fsync,
rename): a crash leaves the old state or the new one, never half of either.

A round that was open when the server app stopped is closed as failed on resume: its
messages died with the SuperLink, so the next round re-runs its work on the same version.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from zorba_common.codec import decode, encode
from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import AlphaDelta, DeviceProfile
from zorba_server.config import ConfigError
from zorba_server.engine import RoundEngine
from zorba_server.members import Member
from zorba_server.rounds import RoundPlan
from zorba_server.safety_state import SafetyState, tables_at

FORMAT = 2
"""2: every published delta (the TRAIN messages' history); 1 kept the engine's last few."""
_UNLIMITED = 1 << 40
"""A checkpoint is our own file, not a peer's message: no byte limit on its parts."""


@dataclass(frozen=True)
class Resumed:
    """What a resume found (for the log and the benchmark)."""

    version: int
    next_round: int
    abandoned_round: int | None
    """The round that was open at the stop and is closed as failed now."""


def save(engine: RoundEngine, path: Path, run_id: str, plans: dict[int, RoundPlan],
         history: Sequence[AlphaDelta]) -> None:
    """Write the engine's state; `plans` holds the plan of every round in its history (the
    engine keeps only their summaries), `history` every delta the run published (the engine
    keeps only the last run.catch_up_rounds)."""
    body = msgpack.packb(_state(engine, run_id, plans, history), use_bin_type=True)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _state(engine: RoundEngine, run_id: str, plans: dict[int, RoundPlan],
           history: Sequence[AlphaDelta]) -> dict[str, Any]:
    alpha = engine.alpha
    closed_rounds = [(r, plans[r.round]) for r in engine.history]
    return {
        "format": FORMAT,
        "run_id": run_id,
        "seed": engine.seed,
        "pool_size": engine.pool_size,
        "fingerprint": engine.fingerprint,
        "footprint": encode(engine.footprint) if engine.footprint is not None else None,
        "alpha": np.ascontiguousarray(alpha, dtype="<f8").tobytes() if alpha is not None else None,
        "version": engine.version,
        "round_counter": engine.round_counter,
        "deltas": [encode(d) for d in history],
        "members": [
            {"client_id": m.client_id, "profile": encode(m.profile), "registered_at": m.registered_at,
             "calibration": m.calibration, "step_time_s": m.step_time_s}
            for m in engine.members.values()
        ],
        "rounds": [
            {"plan": plan.to_record(), "status": r.status, "reports": r.reports,
             "closed_at": r.closed_at, "loss": r.loss, "message": r.message}
            for r, plan in closed_rounds
        ],
        "open": engine.open.plan.to_record() if engine.open is not None else None,
        "safety": engine.safety_state().to_record(),
    }


def run_id_of(path: Path) -> str | None:
    """The run id a checkpoint belongs to, or None when there is none yet."""
    return _read(path)["run_id"] if path.exists() else None


def _read(path: Path) -> dict[str, Any]:
    try:
        state = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.UnpackException) as exc:
        raise ConfigError(f"checkpoint {path} cannot be read ({exc}): restore it from a backup or "
                          "delete it to start a new run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} is not a zorba Flower checkpoint of format {FORMAT}: "
                          "point flower.checkpoint at another file to start a new run")
    return state


def restore(engine: RoundEngine, path: Path, now: float, plans: dict[int, RoundPlan],
            history: list[AlphaDelta]) -> Resumed:
    """Load `path` into a fresh engine built from the same config; fills `plans` and
    `history`."""
    state = _read(path)
    if (state["seed"], state["pool_size"]) != (engine.seed, engine.pool_size):
        raise ConfigError(
            f"checkpoint {path} holds a run with seed={state['seed']}, pool_size={state['pool_size']}; "
            f"the run config says seed={engine.seed}, pool_size={engine.pool_size}: restore those "
            "values or point flower.checkpoint at another file")
    if state["footprint"] is not None:
        footprint = decode(ModelFootprint, state["footprint"], max_bytes=_UNLIMITED)
        alpha = np.frombuffer(state["alpha"], dtype="<f8").reshape(
            engine.pool_size, footprint.num_blocks).copy()
        engine.pin(state["fingerprint"], footprint, alpha)
    engine.version = state["version"]
    history.extend(decode(AlphaDelta, d, max_bytes=_UNLIMITED) for d in state["deltas"])
    engine.deltas.extend(history)  # its deque keeps the last run.catch_up_rounds
    for m in state["members"]:
        # Seen now: a member gets one membership timeout to show up in the grid again.
        engine.add_member(Member(m["client_id"], decode(DeviceProfile, m["profile"], max_bytes=_UNLIMITED),
                                 m["registered_at"], m["calibration"], now, m["step_time_s"]))
    for r in state["rounds"]:
        plan = RoundPlan.from_record(r["plan"])
        plans[plan.round] = plan
        engine.restore_round(plan, r["status"], r["reports"], r["closed_at"], r["loss"], r["message"])
    record = state.get("safety")  # (a checkpoint written before it kept none)
    if record is not None and engine.alpha is not None:
        engine.restore_safety(SafetyState.from_record(
            record, tables_at(history, engine.alpha.shape, record["tables"])))
    engine.round_counter = max(engine.round_counter, state["round_counter"])
    abandoned = None
    if state["open"] is not None:
        plan = RoundPlan.from_record(state["open"])
        plans[plan.round] = plan
        engine.reopen(plan, ())
        closure = engine.decide_close(max(now, plan.deadline))
        engine.apply_close(closure)
        if closure.delta is not None:
            history.append(closure.delta)
        abandoned = plan.round
    engine.finished = engine.run_end() is not None
    return Resumed(engine.version, engine.round_counter, abandoned)
