"""What each field of `GET /v1/status` means: the one place it is written, from which
docs/protocol.md's table is generated (`protocol_docs.status_table`); a test compares these
names with a real status document, so the two cannot drift.

Paths: `a.b` is field b of object a, `a[].b` field b of every element of list a.
"""

from __future__ import annotations

STATUS_FIELDS: dict[str, str] = {
    "run_id": "The run's id (random, fixed when the run is created).",
    "mode": "The run mode (`zorba` or a baseline: run.mode).",
    "seed": "The run seed of the perturbation directions and pool indices.",
    "hyper": "The run's hyper-parameters as the next round uses them.",
    "hyper.lr": "The step of the next round (run.lr, or probed_lr, x lr_factor), before a client's lr_scale.",
    "hyper.mu": "Perturbation scale.",
    "hyper.batch_size": "Examples per local step.",
    "hyper.seq_len": "Tokens per example.",
    "hyper.estimator": "The clients' estimator (`one-sided`, `antithetic`, `normalised`).",
    "hyper.directions": "Directions measured on each batch.",
    "hyper.configured_lr": "run.lr as configured.",
    "hyper.lr_factor": "The loss guard's and the plateaus' factor on run.lr now.",
    "hyper.lr_scaling": "run.lr_scaling.",
    "hyper.step_rule": "run.step_rule: `constant` (run.lr) or `probe` (the lr from the clients' "
                       "start-up probes of the task loss).",
    "hyper.probed_lr": "The lr the clients' task probes give, which replaces run.lr with "
                       "step_rule = probe (null: none usable or not measured; "
                       "zorba_server/step_rule.py).",
    "hyper.loss_jump_tolerance": "The loss guard's tolerance (0: off).",
    "hyper.plateau_rounds": "run.plateau_rounds (0: the step never decays on a plateau).",
    "hyper.pool_slices": "run.pool_slices.",
    "hyper.loss_drift_rounds": "The loss guard's slow rule: applied rounds above the anchor "
                               "before a drift rolls back (0: off).",
    "hyper.loss_drift_tolerance": "How far above the anchor's a drifting check loss may stand.",
    "hyper.max_drift": "The drift bound on each block's distance from its base (0: off, or no "
                       "base RMS known to this engine).",
    "hyper.drift_budget": "run.drift_budget: the predicted generic-text loss rise at the drift "
                          "budget's bound, as a fraction of fluency_tolerance (0: off).",
    "hyper.max_move": "The drift budget's bound on each block's RMS move per parameter, from "
                      "the clients' fluency curvature (0: none: off or not measured).",
    "hyper.fluency_curvature": "The run's fluency curvature: the median of the clients' "
                               "(null: none sent; zorba_server/drift_budget.py).",
    "hyper.fluency_tolerance": "The fluency watch: how far above a client's base value its "
                               "generic-text loss may rise (0: off).",
    "hyper.round_duration_s": "Seconds from a round's opening to its deadline.",
    "hyper.max_steps": "Most local steps a client is assigned.",
    "pool_size": "K, rows of the coefficient table.",
    "num_blocks": "B, columns of the table (0 until the model is pinned).",
    "model_fingerprint": "The pinned model's fingerprint (null until the first registration).",
    "version": "The table's version: published deltas (applied rounds and rollbacks).",
    "finished": "The run reached run.max_rounds applied rounds and ended on a judged version "
                "(its final check closed `checked` or rolled back; zorba_server/final_check.py).",
    "state": "`round open`, or why no round is open (what the server waits for).",
    "current_round": "The open round (null when none is open).",
    "current_round.round": "Its number.",
    "current_round.base_version": "The version its clients train on.",
    "current_round.deadline_in_s": "Seconds until its deadline.",
    "current_round.assigned": "Clients assigned.",
    "current_round.reported": "Reports committed.",
    "current_round.pending": "Reports whose commit is in flight.",
    "current_round.excluded": "Clients the scheduler left out -> why, and what would let them in.",
    "current_round.uncovered_blocks": "Blocks no admitted client could train this round.",
    "current_round.schedule_method": "How its assignment was solved (`milp`, a heuristic, a baseline).",
    "current_round.final_check": "It checks the final version (one step per client, never "
                                 "applied; zorba_server/final_check.py).",
    "block_coverage": "Per block: clients training it in the open (else the last) round.",
    "block_energy": "Each block's estimated E[g_b^2] (zorba_server/block_energy.py).",
    "block_energy.e_g2": "The estimate per block (empty: none yet).",
    "block_energy.rows": "Reported rows behind the estimate.",
    "block_signal": "Each block's estimated signal share rho_b = G_b / s_b, from pairs of clients' "
                    "scalars on common directions (zorba_server/block_signal.py).",
    "block_signal.rho": "The estimate per block, in [0, 1] (empty: the model is not pinned).",
    "block_signal.sd": "Its posterior standard deviation per block.",
    "block_signal.prior": "The fleet's pooled share, which blocks without pairs keep.",
    "block_signal.rows": "Pair rows (two clients, one round) behind the estimate.",
    "block_drift": "Per block: its distance from the base weights, relative to their norm "
                   "(null: no base RMS known to this engine).",
    "block_move": "Per block: the RMS move per parameter of base + alpha from the base weights, "
                  "the norm of its column of alpha (what the drift budget bounds; null: no "
                  "model pinned).",
    "block_base_rms": "Per block: the RMS of its base weights the drift bound uses, as the "
                      "clients sent it (null: none known).",
    "fluency": "The fluency watch's last verdict (null: none yet; zorba_server/fluency_watch.py).",
    "fluency.version": "The version it judged (a round's base version).",
    "fluency.broken": "A majority of the judged clients saw their generic-text loss past the "
                      "tolerance: the round was rolled back.",
    "fluency.reference": "The judged clients' mean generic-text loss on the base model.",
    "fluency.loss": "Their mean generic-text loss at that version.",
    "fluency.breaking": "Clients past the tolerance.",
    "fluency.judged": "Clients judged.",
    "fluency.fluent_version": "The last version the watch found fluent: what it rolls back to "
                              "(null: none since the server started; the base model).",
    "clients": "Every registered client, in registration order.",
    "clients[].client_id": "Its id.",
    "clients[].name": "The name it registered with (may be empty).",
    "clients[].device": "Its device type (`cpu`, `cuda`, `mps`).",
    "clients[].budget_bytes": "The memory budget it declared.",
    "clients[].num_samples": "Its training examples (its aggregation weight).",
    "clients[].active": "Seen within the membership timeout and not left.",
    "clients[].left": "It said it left (POST /v1/leave) and has not come back.",
    "clients[].last_seen_s": "Seconds since its last request (null once it left).",
    "clients[].calibration": "Its memory model's factor from measured peaks (1: as modelled).",
    "clients[].step_time_s": "Its measured (else declared) time of one local step.",
    "clients[].rounds_reported": "Reports it had stored over the run.",
    "clients[].last_loss": "Mean training loss of its last report.",
    "clients[].last_peak_bytes": "Peak memory of its last report (0: not measured).",
    "clients[].guard_outlier_rounds": "Rounds in which the loss guard found its check loss "
                                      "implausible next to the others' (since the server started).",
    "clients[].guard_quarantined": "The loss guard ignores its check losses (implausible too often).",
    "clients[].base_rms_ignored": "Its base RMS values stood apart from the other clients': "
                                  "the drift bound does not use them.",
    "clients[].fluency_curvature": "The fluency curvature it measured at start-up (null: none).",
    "clients[].task_probe": "Its start-up probe of the task loss (e_g2, signal, curvature, "
                            "batch_size; null: none; zorba_server/step_rule.py).",
    "clients[].curvature_ignored": "Its fluency curvature stood more than a factor 2 from the "
                                   "run's (the median of all clients').",
    "clients[].generic_reference": "The fluency watch's reference for it: its generic-text loss "
                                   "on the base model (null: none yet).",
    "clients[].peak_over_budget": "last_peak_bytes / budget_bytes (null: no peak measured).",
    "clients[].last_round_bytes_up": "Request bodies of its last reported round (null: unknown).",
    "clients[].last_round_bytes_down": "Answer bodies of its last reported round (null: unknown).",
    "clients[].blocks": "The blocks it trains in the open round (empty: none).",
    "rounds": "The latest closed rounds (at most 500), oldest first.",
    "rounds[].round": "Its number.",
    "rounds[].status": "`applied`, `rejected` (the loss guard or the fluency watch rolled it "
                       "back), `checked` (a final check found the final version sound) or `failed`.",
    "rounds[].assigned": "Clients assigned.",
    "rounds[].reports": "Reports aggregated (or counted, when it failed).",
    "rounds[].loss": "The reports' mean training loss (null: none).",
    "rounds[].message": "What happened: the loss guard's verdict, the clients it left out, a cut step.",
    "rounds[].opened_at": "When it opened (seconds since 1970, UTC).",
    "rounds[].closed_at": "When it closed (seconds since 1970, UTC).",
    "rounds[].schedule_method": "How its assignment was solved.",
    "counters": "The run's totals (they survive a restart, schedules_solved excepted).",
    "counters.registrations": "Clients registered.",
    "counters.reports_accepted": "Reports stored and acknowledged.",
    "counters.rounds_applied": "Rounds applied.",
    "counters.rounds_rejected": "Rounds the loss guard or the fluency watch rejected (and rolled "
                                "back).",
    "counters.rounds_failed": "Rounds with too few reports.",
    "counters.rounds_checked": "Final checks that found the final version sound (0 or 1).",
    "counters.schedules_solved": "Scheduler runs by this server process.",
}
