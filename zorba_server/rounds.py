"""One round's states and records: its plan, its reports, how it closes (pure: no I/O, no
clock of its own). The policy across rounds (who trains, when a round opens or closes, the
loss guard) is the round engine's, engine.py.

A round is *open* from the moment its plan is stored until its deadline passes or every
assigned client has reported; it then *closes* as

- `applied`: at least `min_reports` reports; their increments are added to alpha and the
  alpha version goes up by one;
- `failed`: too few reports; nothing is applied and the next round re-runs the work
  (new round number, same base version, so reports cannot leak between attempts).

Rounds are numbered 1, 2, ... in opening order; alpha versions count applied rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from zorba_common.codec import encode
from zorba_common.errors import InvalidScalarError
from zorba_common.messages import Assignment, HyperParams, Report
from zorba_common.readout import MAX_READOUT_INDICES_PER_ROUND
from zorba_common.scalars import check_scalars
from zorba_server import errors
from zorba_server.aggregation import Contribution, RoundDelta, aggregate
from zorba_server.config import AggregationConfig

# Re-exported: a round's record and its readers name the statuses through this module.
from zorba_server.round_status import APPLIED as APPLIED  # noqa: I001
from zorba_server.round_status import CHECKED as CHECKED
from zorba_server.round_status import FAILED as FAILED
from zorba_server.round_status import OPEN as OPEN
from zorba_server.round_status import REJECTED as REJECTED


@dataclass(frozen=True)
class ClientPlan:
    blocks: tuple[int, ...]
    num_steps: int
    lr_scale: float = 1.0
    """The client's step is the round's lr times this (see RunConfig.lr_scaling)."""
    first_step: int = 0
    """Where its pool indices start in the round's list (0 for every client when the clients
    share the list's prefix; see RunConfig.pool_slices)."""

    readout_first: int = 0
    readout_count: int = 0
    """Its slice of the round's label-readout list (`RoundPlan.readout_pool_indices`): the
    readout pool indices only it measures (0 of them: the readout takes its body's pool
    indices, as before the readout had its own)."""

    def steps(self) -> slice:
        """Its part of the round's pool-index list."""
        return slice(self.first_step, self.first_step + self.num_steps)

    def readout_steps(self) -> slice:
        """Its part of the round's readout pool-index list."""
        return slice(self.readout_first, self.readout_first + self.readout_count)


def readout_indices_needed(num_steps: int, directions: int, readout_directions: int) -> int:
    """The readout pool indices a client of `num_steps` body steps measures: `readout_directions`
    new ones for each of its batches (of `directions` body steps, the last one possibly short)."""
    return readout_directions * -(-num_steps // max(1, directions))


def slice_readout(clients: Mapping[str, ClientPlan], directions: int, readout_directions: int,
                  pool_size: int) -> dict[str, ClientPlan]:
    """Each client's own slice of the round's readout list, consecutive in client-id order.
    A client gets what its batches need, at most an equal share of the round's byte budget
    (MAX_READOUT_INDICES_PER_ROUND and the pool's size, zorba_common.readout) in whole
    batches; where that share is not one batch, none (its readout then takes its body's pool
    indices, as before the readout had its own). The list's entries are distinct, so no two
    clients measure the same readout direction."""
    if not clients or readout_directions <= 0:
        return dict(clients)
    share = min(MAX_READOUT_INDICES_PER_ROUND, pool_size) // len(clients)
    share -= share % readout_directions
    sliced, offset = {}, 0
    for cid in sorted(clients):
        count = min(readout_indices_needed(clients[cid].num_steps, directions, readout_directions), share)
        sliced[cid] = replace(clients[cid], readout_first=offset, readout_count=count)
        offset += count
    return sliced


def slice_pool(clients: Mapping[str, ClientPlan], pool_slices: str) -> dict[str, ClientPlan]:
    """Each client's first step in the round's pool-index list: 0 for every client (`shared`),
    or consecutive slices in client-id order (`disjoint`; RunConfig.pool_slices)."""
    if pool_slices == "shared":
        return {cid: replace(plan, first_step=0) for cid, plan in clients.items()}
    sliced, offset = {}, 0
    for cid in sorted(clients):
        sliced[cid] = replace(clients[cid], first_step=offset)
        offset += clients[cid].num_steps
    return sliced


@dataclass(frozen=True)
class RoundPlan:
    """Everything decided when a round opens; stored before any client sees it."""

    round: int
    base_version: int
    opened_at: float
    deadline: float
    hyper: HyperParams
    pool_indices: tuple[int, ...]
    """The round's pool indices; each client measures its slice (`ClientPlan.steps`)."""
    clients: Mapping[str, ClientPlan]
    excluded: Mapping[str, str] = field(default_factory=dict)
    """Members the scheduler left out, with its reason."""
    uncovered_blocks: tuple[int, ...] = ()
    schedule_method: str = ""
    step_decays: int = 0
    """How many times a plateau of the check losses had cut the step when this round opened
    (kept with the plan, so a restarted server continues at the same step)."""
    measure_generic: frozenset[str] = frozenset()
    """Clients asked for their generic-text loss (the fluency watch)."""
    readout_pool_indices: tuple[int, ...] = ()
    """The round's label-readout pool indices (zorba_server.pool_indices.round_readout_indices),
    distinct; each client measures its slice (`ClientPlan.readout_steps`). Empty: the readout
    is off, or the plan is from before the readout had its own indices."""
    final_check: bool = False
    """The round checks the final version: its clients' check and generic-text losses judge
    it, its steps are never applied (zorba_server/final_check.py)."""

    def assignment_for(self, client_id: str, now: float) -> Assignment:
        plan = self.clients[client_id]
        return Assignment(
            round=self.round,
            base_version=self.base_version,
            blocks=plan.blocks,
            pool_indices=self.pool_indices[plan.steps()],
            hyper=replace(self.hyper, lr=self.client_lr(client_id)),
            deadline_in_s=max(0.0, self.deadline - now),
            deadline_unix=self.deadline,
            measure_generic=client_id in self.measure_generic,
            readout_pool_indices=self.readout_pool_indices[plan.readout_steps()],
        )

    def client_lr(self, client_id: str) -> float:
        """The step size the client is told, and the one its scalars are aggregated with."""
        return float(np.float64(self.hyper.lr) * self.clients[client_id].lr_scale)

    def to_record(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "base_version": self.base_version,
            "opened_at": self.opened_at,
            "deadline": self.deadline,
            "hyper": [self.hyper.lr, self.hyper.mu, self.hyper.batch_size, self.hyper.seq_len,
                      self.hyper.estimator, self.hyper.directions, self.hyper.trust_radius,
                      self.hyper.readout_directions, self.hyper.readout_lr,
                      self.hyper.readout_trust_radius],
            "pool_indices": list(self.pool_indices),
            "clients": {cid: [list(p.blocks), p.num_steps, p.lr_scale, p.first_step,
                              p.readout_first, p.readout_count]
                        for cid, p in self.clients.items()},
            "readout_pool_indices": list(self.readout_pool_indices),
            "excluded": dict(self.excluded),
            "uncovered_blocks": list(self.uncovered_blocks),
            "schedule_method": self.schedule_method,
            "step_decays": self.step_decays,
            "measure_generic": sorted(self.measure_generic),
            "final_check": self.final_check,
        }

    @staticmethod
    def from_record(rec: Mapping[str, Any]) -> RoundPlan:
        # Plans stored before the estimator was a setting have 4 entries (antithetic, n = 1),
        # before the trust region 6 (no region, as their clients were told), before the label
        # readout 7 (no readout), before the readout's own radius 9 (it took the body's).
        lr, mu, batch_size, seq_len, *estimator = rec["hyper"]
        if len(estimator) == 5:
            estimator.append(estimator[2])
        return RoundPlan(
            round=rec["round"],
            base_version=rec["base_version"],
            opened_at=rec["opened_at"],
            deadline=rec["deadline"],
            hyper=HyperParams(lr, mu, batch_size, seq_len, *estimator),
            pool_indices=tuple(rec["pool_indices"]),
            # Plans stored before per-client step sizes have no scale (1.0), before
            # disjoint slices no first step (0: every client took the list's prefix), before
            # the readout's own indices no readout slice (the readout took the body's).
            clients={cid: ClientPlan(tuple(p[0]), p[1], *p[2:6]) for cid, p in rec["clients"].items()},
            readout_pool_indices=tuple(rec.get("readout_pool_indices", ())),
            excluded=dict(rec["excluded"]),
            uncovered_blocks=tuple(rec["uncovered_blocks"]),
            schedule_method=rec["schedule_method"],
            step_decays=rec.get("step_decays", 0),
            # Plans stored before the fluency watch asked nobody.
            measure_generic=frozenset(rec.get("measure_generic", ())),
            final_check=bool(rec.get("final_check", False)),  # stored before it: none was
        )


@dataclass
class ReceivedReport:
    client_id: str
    report: Report
    body_hash: bytes
    received_at: float
    encoded: bytes | None = field(default=None, repr=False, compare=False)
    """`encode(report)` when the shell has it already (hashed): stored as is, not encoded again."""

    def canonical(self) -> bytes:
        """The report's canonical encoding, as stored."""
        return self.encoded if self.encoded is not None else encode(self.report)


@dataclass(frozen=True)
class RoundOutcome:
    round: int
    status: str
    reports: int
    message: str
    delta: RoundDelta | None
    loss: float | None
    """Sample-weighted mean of the reports' loss_mean (None without reports)."""


def check_report(plan: RoundPlan, client_id: str, report: Report, *, max_abs_scalar: float,
                 weights_only: bool = False) -> None:
    """Refuse a report that does not fit this round's plan (raises a Refusal, changes nothing).

    `weights_only` (the fedavg baseline): the training travels as uploaded weights, so the
    report has no ZO steps, only its measurements and a positive sample count.
    """
    own = plan.clients.get(client_id)
    if own is None:
        raise errors.conflict(
            "not_assigned",
            f"client {client_id} has no assignment in round {plan.round}; poll GET /v1/rounds/next",
        )
    if report.base_version != plan.base_version:
        raise errors.conflict(
            "stale_version",
            f"round {plan.round} trains on alpha version {plan.base_version}, the report says "
            f"{report.base_version}: sync to the round's base version and train again",
        )
    if weights_only:
        if report.steps or report.num_samples <= 0:
            raise errors.unprocessable(
                "wrong_steps", "a fedavg report carries no (k, g) steps and a positive num_samples")
        return
    if not report.steps:
        raise errors.unprocessable("wrong_steps", "a report needs at least one (k, g) step")
    if len(report.steps) > own.num_steps:
        raise errors.unprocessable(
            "wrong_steps",
            f"{len(report.steps)} steps reported, the assignment has {own.num_steps}",
        )
    reported = tuple(k for k, _ in report.steps)
    assigned = plan.pool_indices[own.steps()][:len(reported)]
    if reported[:len(assigned)] != assigned:  # one comparison; then the first step that differs
        t, k, expected = next((t, k, e) for t, (k, e) in
                              enumerate(zip(reported, assigned, strict=False)) if k != e)
        raise errors.unprocessable(
            "wrong_steps",
            f"step {t} reports pool index {k}, the assignment gave {expected}: "
            "report steps in the order of the assignment's pool_indices",
        )
    try:
        check_scalars(report.steps, max_abs_scalar)
    except InvalidScalarError as exc:
        raise errors.unprocessable("invalid_scalar", str(exc)) from None
    _check_readout_steps(plan, own, report, max_abs_scalar)


def _check_readout_steps(plan: RoundPlan, own: ClientPlan, report: Report,
                         max_abs_scalar: float) -> None:
    """The label readout's scalars: only where the round asked for them, each k one of the
    client's own readout pool indices (where it has any; else its body's) at most
    once, each g a valid scalar."""
    if not report.readout_steps:
        return
    if plan.hyper.readout_directions <= 0:
        raise errors.unprocessable(
            "wrong_steps", f"round {plan.round} measures no label readout (readout_directions "
            "0): send no readout_steps")
    ks = [k for k, _ in report.readout_steps]
    allowed, field_name = ((plan.readout_pool_indices[own.readout_steps()], "readout_pool_indices")
                           if own.readout_count else (plan.pool_indices[own.steps()], "pool_indices"))
    stray = sorted(set(ks) - set(allowed))
    if stray:
        raise errors.unprocessable(
            "wrong_steps", f"readout_steps name pool index {stray[0]}, which is not one of the "
            f"assignment's {field_name}")
    if len(set(ks)) != len(ks):
        raise errors.unprocessable(
            "wrong_steps", "readout_steps name a pool index twice: sum its scalars into one")
    try:
        check_scalars(report.readout_steps, max_abs_scalar)
    except InvalidScalarError as exc:
        raise errors.unprocessable("invalid_scalar", f"readout_steps: {exc}") from None


def decide_round(plan: RoundPlan, reports: Mapping[str, ReceivedReport],
                 weights: Mapping[str, float], *, min_reports: int,
                 aggregation: AggregationConfig, readout_block: int | None = None) -> RoundOutcome:
    """Decide a closing round's fate and, when it applies, its increments.

    `readout_block`: the label readout's column R (zorba_common.readout) when the run has one.
    A report's readout scalars are a second contribution of its client, to block R alone, at
    the round's readout step (lr x readout_lr / lr): the rule (mean, median, ...) treats them
    as every block's, and the delta carries column R with the body's."""
    count = len(reports)
    loss = _weighted_loss(reports, weights)
    if count < min_reports:
        return RoundOutcome(
            plan.round, FAILED, count,
            f"{count} of {len(plan.clients)} assigned clients reported by the deadline, "
            f"{min_reports} needed: nothing applied, the work is re-run in the next round",
            None, loss,
        )
    contributions = [
        Contribution(cid, plan.clients[cid].blocks, weights[cid], r.report.steps,
                     plan.clients[cid].lr_scale)
        for cid, r in reports.items()
    ]
    if readout_block is not None:
        readout_scale = plan.hyper.readout_lr / plan.hyper.lr
        contributions += [Contribution(cid, (readout_block,), weights[cid], r.report.readout_steps,
                                       readout_scale)
                          for cid, r in reports.items() if r.report.readout_steps]
    delta = aggregate(contributions, plan.hyper.lr, aggregation)
    return RoundOutcome(
        plan.round, APPLIED, count,
        f"{count} of {len(plan.clients)} assigned clients reported", delta, loss,
    )


def _weighted_loss(reports: Mapping[str, ReceivedReport],
                   weights: Mapping[str, float]) -> float | None:
    total = sum(weights[cid] for cid in reports)
    if not reports or total <= 0:
        return None
    return sum(weights[cid] * r.report.loss_mean for cid, r in sorted(reports.items())) / total
