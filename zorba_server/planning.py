"""Planning a round: the schedule, each client's local steps and step scale, the pool indices.

`RoundPlanning.propose_round` decides the next round's `RoundPlan` without changing any round
state (the shell stores it, then calls `open_round`). The schedule is reused until the active
members (or a calibration band) change, or the run mode redraws its blocks every round. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from zorba_common.memory_model import usable_budget
from zorba_server import calibration, final_check
from zorba_server.engine_state import OpenRound
from zorba_server.members import Member, Membership
from zorba_server.pool_indices import round_pool_indices, round_readout_indices
from zorba_server.rounds import ClientPlan, RoundPlan, slice_pool, slice_readout
from zorba_server.scheduler import ClientSpec, Schedule, local_steps


class RoundPlanning(Membership):
    """The round engine's planning: which clients train which blocks, for how many steps."""

    def propose_round(self, now: float, members: Sequence[Member] | None = None) -> RoundPlan | None:
        """The next round's plan, or None (with `idle_reason` saying why). Changes no round
        state: the shell stores the plan, then calls `open_round`. `members`: the active
        members as of `now` (a shell that plans off its event loop takes them first)."""
        if self.footprint is None:
            self.idle_reason = "waiting for the first client to register (the model is not pinned)"
            return None
        if self.open is not None or self.finished:
            return None
        run = self.config.run
        final = final_check.due(run, self.safety_measured, self.rounds_applied)
        members = list(self.active_members(now) if members is None else members)
        if len(members) < run.min_clients:
            self._idle(f"waiting for clients: {len(members)} active, {run.min_clients} needed to "
                       "open a round", final)
            return None
        schedule = self._schedule(members)
        if schedule is None:
            return None
        if len(schedule.assignments) < run.min_reports:
            # Such a round could only fail: wait for more clients instead.
            self._idle(f"the scheduler admitted {len(schedule.assignments)} clients, fewer than "
                       f"min_reports={run.min_reports}: waiting for more clients", final)
            return None
        clients = {
            m.client_id: ClientPlan(
                schedule.assignments[m.client_id],
                final_check.STEPS if final else local_steps(
                    m.step_time_s, self.compute_time_s(), min_steps=run.min_steps,
                    max_steps=run.max_steps),
                self.lr_scale(schedule.assignments[m.client_id]))
            for m in members if m.client_id in schedule.assignments
        }
        clients = slice_pool(clients, run.pool_slices)
        length = max(p.first_step + p.num_steps for p in clients.values())
        hyper = self.hyper()
        if hyper.readout_directions > 0 and not final and not self.weights_only:
            # The readout's directions cost no forward: each client measures its own.
            clients = slice_readout(clients, hyper.directions, hyper.readout_directions, self.pool_size)
        readout_length = sum(p.readout_count for p in clients.values())
        return RoundPlan(
            round=self.round_counter, base_version=self.version, opened_at=now,
            deadline=now + run.round_duration_s, hyper=hyper,
            pool_indices=round_pool_indices(self.seed, self.round_counter, length, self.pool_size),
            readout_pool_indices=round_readout_indices(self.seed, self.round_counter, readout_length,
                                                       self.pool_size),
            clients=clients, excluded=dict(schedule.excluded_clients),
            uncovered_blocks=tuple(sorted(schedule.uncovered_blocks)),
            schedule_method=schedule.method, step_decays=self._plateau.step_decays,
            measure_generic=self._asked_for_generic(clients), final_check=final,
        )

    def _idle(self, reason: str, final: bool) -> None:
        self.idle_reason = final_check.waiting(reason, self.version) if final else reason

    def _asked_for_generic(self, clients: Iterable[str]) -> frozenset[str]:
        """The clients the fluency watch asks for their generic-text loss: those that sent
        their base RMS (the same protocol revision brought `measure_generic`, so an older
        client, whose strict decoder knows no such field, is never sent it)."""
        if self.config.run.fluency_tolerance <= 0 or self.weights_only:
            return frozenset()
        return frozenset(cid for cid in clients
                         if cid in self.members and self.members[cid].profile.base_rms is not None)

    def open_round(self, plan: RoundPlan) -> None:
        self.open = OpenRound(plan)
        self.round_counter = plan.round + 1

    def compute_time_s(self) -> float:
        """Seconds of a round a client spends on steps: it also syncs, reports and waits."""
        return self.config.run.round_duration_s * self.config.run.compute_fraction

    def _schedule(self, members: list[Member]) -> Schedule | None:
        """Reuse the last schedule unless membership (or a calibration band) changed, or the
        mode redraws its blocks every round."""
        key: tuple[Any, ...] = tuple(sorted(
            (m.client_id, calibration.band(m.calibration)) for m in members))
        progress = self.config.scheduler.objective == "progress"
        if self.mode.redraws_each_round or progress:
            # The progress objective follows the signal estimate, which every round updates.
            key += (self.round_counter,)
        if key == self._schedule_key and self.last_schedule is not None:
            return self.last_schedule if self.last_schedule.assignments else None
        assert self.footprint is not None
        run = self.config.run
        specs = [
            ClientSpec(m.client_id, usable_budget(m.profile.memory_budget_bytes, run.memory_headroom),
                       self.memory_model(m.profile, m.calibration), float(m.profile.num_samples),
                       m.step_time_s, self._previous.get(m.client_id, frozenset()))
            for m in members
        ]
        sched_config = dataclasses.replace(
            self.config.scheduler, round_deadline_s=self.compute_time_s(),
            min_steps=run.min_steps, max_steps=run.max_steps)
        estimate = self.signal_estimate() if progress else None
        if estimate is not None and estimate.rows:
            sched_config = dataclasses.replace(
                sched_config, signal_share=tuple(float(v) for v in estimate.rho),
                signal_sd=tuple(float(v) for v in estimate.sd))
        schedule = self._solve(specs, self.footprint.block_params, sched_config,
                               round_seed(self.seed, self.round_counter))
        self.schedule_solve_s = schedule.solve_s
        self.schedules_solved += 1
        self._schedule_key, self.last_schedule = key, schedule
        if not schedule.assignments:
            reasons = "; ".join(f"{cid}: {why}"
                                for cid, why in sorted(schedule.excluded_clients.items()))
            self.idle_reason = f"the scheduler admitted no client ({reasons})"
            return None
        return schedule


def round_seed(run_seed: int, round_: int) -> int:
    """A per-round seed for modes that draw their assignment anew each round."""
    return int(np.random.SeedSequence([run_seed, round_]).generate_state(1, dtype=np.uint64)[0])

