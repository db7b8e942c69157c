"""A restarted server's engine, rebuilt from the store's snapshot.

The snapshot holds what was committed; this turns it back into the engine's members, rounds
and alpha, and the figures a person sees, so that a restart changes nothing they show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zorba_server.config import ConfigError, RunConfig
from zorba_server.engine import RoundEngine
from zorba_server.enrolment import Tokens
from zorba_server.members import LEFT, Member
from zorba_server.rounds import OPEN
from zorba_server.storage import Snapshot
from zorba_server.traffic import ClientTraffic


@dataclass
class Resumed:
    run_id: str
    created_at: float
    tokens: Tokens = field(default_factory=Tokens)
    """Each known client's bearer token (by its hash), as registration stored it."""
    traffic: dict[str, ClientTraffic] = field(default_factory=dict)
    """Each client's last reported round's bytes, as its last report's row stored them."""


def check_same_run(snap: Snapshot, run: RunConfig) -> None:
    """Refuse a config that contradicts the stored run (another seed, pool or model)."""
    if (snap.seed, snap.pool_size) != (run.seed, run.pool_size):
        raise ConfigError(
            f"the database holds run {snap.run_id} with seed={snap.seed}, pool_size="
            f"{snap.pool_size}; the config says seed={run.seed}, pool_size={run.pool_size}. "
            "Restore those values or start a new run with another storage.path"
        )
    pins = (("model_fingerprint", run.model_fingerprint, snap.model_fingerprint),
            ("footprint", run.footprint, snap.footprint))
    for name, ours, theirs in pins:
        if ours is not None and theirs is not None and ours != theirs:
            raise ConfigError(
                f"run.{name} in the config differs from the one run {snap.run_id} pinned: "
                "remove it from the config or start a new run with another storage.path"
            )


def resume(engine: RoundEngine, snap: Snapshot, run: RunConfig, now: float) -> Resumed:
    """Load `snap` into a fresh `engine`; what the shell keeps itself comes back."""
    check_same_run(snap, run)
    out = Resumed(snap.run_id or "", snap.created_at)
    engine.version = snap.version
    if snap.model_fingerprint and snap.footprint is not None and snap.alpha is not None:
        columns = engine.table_columns(snap.footprint)
        if snap.alpha.shape[1] != columns:
            raise ConfigError(
                f"run {snap.run_id}'s coefficient table has {snap.alpha.shape[1]} columns, and "
                f"run.readout_directions = {run.readout_directions} needs {columns}: the label "
                "readout is on or off for a whole run; keep the run's setting or start a new run "
                "with another storage.path")
        engine.pin(snap.model_fingerprint, snap.footprint, snap.alpha)
    engine.deltas.extend(snap.deltas)
    for c in snap.clients:
        # Every known client counts as seen at restart (it gets one membership timeout to come
        # back before the schedule drops it), except one that said it left.
        seen = LEFT if c.left_at is not None else now
        member = Member(c.client_id, c.profile, c.registered_at, c.calibration, seen,
                        c.profile.step_time_s, guard_outlier_rounds=c.guard_outlier_rounds)
        # What it reported before the restart, so the status page and counters go on.
        history = snap.client_reports.get(c.client_id)
        if history is not None:
            member.rounds_reported = history.count
            member.last_loss, member.last_peak_bytes = history.last_loss, history.last_peak_bytes
            engine.reports_accepted += history.count
            if history.last_round_bytes is not None:
                out.traffic[c.client_id] = ClientTraffic(last_round=history.last_round_bytes)
        engine.add_member(member)
        out.tokens.add(c.token_hash, c.client_id)
    for r in snap.rounds:  # in order: the history (the round counts read it) and the counter
        engine.restore_round(r.plan, r.status, r.reports, r.closed_at, r.loss, r.message)
    if snap.rounds and snap.rounds[-1].status == OPEN:
        engine.reopen(snap.rounds[-1].plan, snap.open_reports)
    if snap.safety is not None:
        engine.restore_safety(snap.safety)
    end = engine.run_end()
    if end is not None:
        engine.finished, engine.idle_reason = True, end
    return out
