"""The run's status as `/v1/status` and the status page show it (a pure view of the engine)."""

from __future__ import annotations

import dataclasses
from typing import Any

from zorba_server.drift import block_drift
from zorba_server.engine import RoundEngine
from zorba_server.traffic import ClientTraffic

STATUS_ROUNDS = 500
"""Most recent rounds listed."""


def run_status(engine: RoundEngine, run_id: str, counters: dict[str, int], now: float, *,
               pending: int = 0, traffic: dict[str, ClientTraffic] | None = None) -> dict[str, Any]:
    traffic = traffic or {}
    active = {m.client_id for m in engine.active_members(now)}
    r = engine.open
    plan = r.plan if r is not None else None
    current: dict[str, Any] | None = None
    if plan is not None and r is not None:
        current = {
            "round": plan.round, "base_version": plan.base_version,
            "deadline_in_s": engine.time_left(now), "assigned": len(plan.clients),
            "reported": len(r.received), "pending": pending,
            "excluded": dict(plan.excluded), "uncovered_blocks": list(plan.uncovered_blocks),
            "schedule_method": plan.schedule_method, "final_check": plan.final_check,
        }
    num_blocks = engine.footprint.num_blocks if engine.footprint else 0
    coverage = [0] * num_blocks
    shown = plan or engine.last_plan
    for p in (shown.clients.values() if shown else ()):
        for b in p.blocks:
            coverage[b] += 1
    run, hyper = engine.config.run, engine.hyper()
    quarantined = engine.guard_quarantined()
    return {
        "run_id": run_id, "mode": run.mode, "seed": engine.seed,
        "hyper": {"lr": hyper.lr, "mu": hyper.mu, "batch_size": hyper.batch_size,
                  "seq_len": hyper.seq_len, "estimator": hyper.estimator,
                  "directions": hyper.directions, "configured_lr": run.lr,
                  "lr_factor": engine.lr_factor(), "lr_scaling": run.lr_scaling,
                  "step_rule": run.step_rule, "probed_lr": engine.probed_step.lr,
                  "loss_jump_tolerance": run.loss_jump_tolerance,
                  "plateau_rounds": run.plateau_rounds, "pool_slices": run.pool_slices,
                  "loss_drift_rounds": run.loss_drift_rounds,
                  "loss_drift_tolerance": run.loss_drift_tolerance,
                  # The bound acts only where the engine knows the blocks' base RMS.
                  "max_drift": run.max_drift if engine.base_rms is not None else 0.0,
                  "drift_budget": run.drift_budget, "max_move": engine.max_move(),
                  "fluency_curvature": engine.fluency_curvature,
                  "fluency_tolerance": run.fluency_tolerance,
                  "round_duration_s": run.round_duration_s, "max_steps": run.max_steps},
        "pool_size": engine.pool_size,
        "num_blocks": num_blocks, "model_fingerprint": engine.fingerprint,
        "version": engine.version, "finished": engine.finished,
        "state": "round open" if r is not None else engine.idle_reason,
        "current_round": current,
        "block_coverage": coverage,
        "block_energy": _block_energy(engine),
        "block_signal": _block_signal(engine),
        "block_drift": (None if engine.base_rms is None or engine.alpha is None else
                        [round(float(d), 5) for d in block_drift(engine.body_alpha(), engine.base_rms)]),
        "block_base_rms": None if engine.base_rms is None else list(engine.base_rms),
        # A block's move per parameter is its drift relative to an RMS of 1 (drift_budget.py).
        "block_move": (None if engine.alpha is None else [
            float(f"{m:.6g}") for m in block_drift(engine.body_alpha(), (1.0,) * num_blocks)]),
        "fluency": _fluency(engine),
        "clients": [
            {"client_id": m.client_id, "name": m.profile.name,
             "device": m.profile.device_type, "budget_bytes": m.profile.memory_budget_bytes,
             "num_samples": m.profile.num_samples,
             "active": m.client_id in active, "left": m.left,
             "last_seen_s": now - m.last_seen if not m.left else None,
             "calibration": m.calibration, "step_time_s": m.step_time_s,
             "rounds_reported": m.rounds_reported, "last_loss": m.last_loss,
             "guard_outlier_rounds": m.guard_outlier_rounds,
             "guard_quarantined": m.client_id in quarantined,
             "base_rms_ignored": m.client_id in engine.base_rms_ignored,
             "fluency_curvature": m.profile.fluency_curvature,
             "curvature_ignored": m.client_id in engine.curvature_ignored,
             "task_probe": (dataclasses.asdict(m.profile.task_probe)
                            if m.profile.task_probe is not None else None),
             "generic_reference": (reference.loss if (reference := engine.generic_references.get(
                 m.client_id)) is not None else None),
             "last_peak_bytes": m.last_peak_bytes,
             "peak_over_budget": (m.last_peak_bytes / m.profile.memory_budget_bytes
                                  if m.last_peak_bytes else None),
             **_round_bytes(traffic.get(m.client_id)),
             "blocks": list(plan.clients[m.client_id].blocks)
             if plan is not None and m.client_id in plan.clients else []}
            for m in sorted(engine.members.values(), key=lambda m: m.registered_at)
        ],
        "rounds": [
            {"round": h.round, "status": h.status, "assigned": h.assigned, "reports": h.reports,
             "loss": h.loss, "message": h.message, "opened_at": h.opened_at,
             "closed_at": h.closed_at, "schedule_method": h.method}
            for h in engine.history[-STATUS_ROUNDS:]
        ],
        "counters": counters,
    }


def _round_bytes(traffic: ClientTraffic | None) -> dict[str, int | None]:
    """The client's last reported round's body bytes each way (None: none known)."""
    last = traffic.last_round if traffic is not None else None
    return {"last_round_bytes_up": last.up if last is not None else None,
            "last_round_bytes_down": last.down if last is not None else None}


def _block_energy(engine: RoundEngine) -> dict[str, Any]:
    """Each block's estimated E[g_b^2] (zorba_server/block_energy.py) and the rows behind it."""
    energy = engine.energy
    if energy is None:
        return {"e_g2": [], "rows": 0}
    return {"e_g2": [float(v) for v in energy.estimate()], "rows": len(energy.rows)}


def _fluency(engine: RoundEngine) -> dict[str, Any] | None:
    """The fluency watch's last verdict (zorba_server/fluency_watch.py; None: none yet)."""
    verdict = engine.last_fluency
    if verdict is None:
        return None
    return {"version": verdict.version, "broken": verdict.broken, "reference": verdict.reference,
            "loss": verdict.now, "breaking": verdict.breaking, "judged": verdict.judged,
            "fluent_version": engine.fluent.version if engine.fluent is not None else None}


def _block_signal(engine: RoundEngine) -> dict[str, Any]:
    """Each block's estimated signal share rho_b (zorba_server/block_signal.py)."""
    estimate = engine.signal_estimate()
    if estimate is None:
        return {"rho": [], "sd": [], "prior": 0.0, "rows": 0}
    return {"rho": [float(v) for v in estimate.rho], "sd": [float(v) for v in estimate.sd],
            "prior": estimate.prior, "rows": estimate.rows}
