"""The Flower server app's main loop: the round engine driven over a Flower `Grid`.

Every decision is the engine's (`zorba_server.engine.RoundEngine`, the same the aiohttp
server drives); this loop only moves messages and time around it:

    admit     nodes new to the grid get a QUERY for their device profile; the engine's
              registration check admits them (or says why not)
    plan      the engine's next round; one TRAIN message per assigned node, its TTL the
              round's deadline
    collect   send_and_receive until the deadline; each reply's report is checked and
              accepted by the engine; a node whose message failed or went unanswered is
              dropped from the run
    close     the engine aggregates, and the checkpoint is written before the next round

Flower's `Strategy.start()` wants an ArrayRecord and an evaluate phase per round; ZorBA
moves neither weights nor evaluation, so this is a plain loop over `send_and_receive`.

Its lines go to a child of Flower's own logger ("flwr"), whose console handler is the one a
run's log stream (`flwr log`, the SuperLink's output) carries at INFO; a logger of our own
would reach only Python's last-resort handler, which shows warnings alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import LOGGER_NAME

from zorba_common.codec import SchemaError
from zorba_common.messages import AlphaDelta
from zorba_flower import checkpoint, codec
from zorba_server.engine import RoundEngine
from zorba_server.errors import Refusal
from zorba_server.idempotency import report_hash
from zorba_server.members import Member
from zorba_server.round_line import closed_round_line
from zorba_server.rounds import ReceivedReport, RoundPlan

log = logging.getLogger(f"{LOGGER_NAME}.zorba.server")


class Grid(Protocol):
    """The part of `flwr.serverapp.Grid` this loop uses (a fake one in the tests)."""

    def get_node_ids(self) -> Iterable[int]: ...

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]: ...


@dataclass(frozen=True)
class LoopSettings:
    checkpoint: Path
    run_id: str
    query_timeout_s: float = 120.0
    """How long a QUERY for device profiles may take (a node loads and times the model)."""
    idle_wait_s: float = 1.0
    """Pause between attempts to open a round when none can open."""
    max_idle_s: float = 120.0
    """Give up when no round could open for this long (the engine's reason is raised)."""


@dataclass(frozen=True)
class NodeTiming:
    """What a node measured of its own handling of one TRAIN message."""

    node_id: int
    handler_s: float
    train_s: float
    rss_peak_bytes: int


@dataclass(frozen=True)
class RoundLog:
    """One round as this loop saw it (the benchmark's figures)."""

    round: int
    status: str
    assigned: dict[int, tuple[int, ...]]
    """node id -> blocks it was asked to train."""
    reported: tuple[int, ...]
    dropped: tuple[int, ...]
    wall_s: float
    """From sending the TRAIN messages to the last reply (or the deadline)."""
    timings: tuple[NodeTiming, ...]
    version: int
    loss: float | None = None
    """Sample-weighted mean training loss of the round's reports (None without reports)."""

    @property
    def overhead_s(self) -> float | None:
        """The round's wall time beyond the longest training among the nodes that reported."""
        trained = [t.train_s for t in self.timings]
        return self.wall_s - max(trained) if trained else None


class NoRoundError(RuntimeError):
    """No round could open for `max_idle_s`."""


def instruction(content: RecordDict, message_type: str, node: int, group_id: str,
                ttl: float) -> Message:
    """A message to `node`. Flower's Message constructor, not the deprecated
    `Grid.create_message` (whose one-time deprecation warning was all a run's log showed): it
    takes the run and sender from the process's `TaskIdentity`, which Flower sets in every
    process that runs a ServerApp (and the tests' fake grid sets as the simulation does)."""
    return Message(content, node, message_type, ttl=ttl, group_id=group_id)


def client_id(node_id: int, partition: int) -> str:
    """A node's client id, its partition first: the engine takes clients in id order (it sums
    their reports so, and the scheduler sees them so), and this way that order is the
    partitions', as in zorba_sim (client i holds partition i), whatever ids Flower drew. The
    node id keeps it unique where nodes share a partition."""
    return f"p{partition:06d}-node-{node_id}"


def node_of(cid: str) -> int:
    return int(cid.rpartition("-node-")[2])


@dataclass
class FlowerRounds:
    engine: RoundEngine
    settings: LoopSettings
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    plans: dict[int, RoundPlan] = field(default_factory=dict)
    rounds: list[RoundLog] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)
    """Nodes the engine would not admit or that failed a round: not asked again this run."""
    history: list[AlphaDelta] = field(default_factory=list)
    """Every delta the run published, versions 1..engine.version (the engine keeps only the
    last run.catch_up_rounds): each TRAIN message carries it (codec.TrainInstruction)."""
    resumed: checkpoint.Resumed | None = None
    on_round: Callable[[RoundLog], None] | None = None
    """Called with each closed round (the server app appends it to flower.rounds-log)."""

    def __post_init__(self) -> None:
        if self.settings.checkpoint.exists():
            self.resumed = checkpoint.restore(self.engine, self.settings.checkpoint, self.clock(),
                                              self.plans, self.history)
            log.info("resumed from %s: alpha version %d, next round %d%s", self.settings.checkpoint,
                     self.resumed.version, self.resumed.next_round,
                     f" (round {self.resumed.abandoned_round} was open: closed as failed)"
                     if self.resumed.abandoned_round is not None else "")
            self._save()

    # ------------------------------------------------------------------ the loop

    def run(self, grid: Grid) -> None:
        """Rounds until the engine finishes (run.max_rounds applied rounds)."""
        idle_since = self.clock()
        while not self.engine.finished:
            self._admit(grid)
            plan = self.engine.propose_round(self.clock())
            if plan is None:
                if self.clock() - idle_since > self.settings.max_idle_s:
                    raise NoRoundError(f"no round could open for {self.settings.max_idle_s:.0f} s: "
                                       f"{self.engine.idle_reason}")
                self.sleep(self.settings.idle_wait_s)
                continue
            self.run_round(grid, plan)
            idle_since = self.clock()

    def run_round(self, grid: Grid, plan: RoundPlan) -> RoundLog:
        engine = self.engine
        engine.open_round(plan)
        self.plans[plan.round] = plan
        self._save()
        nodes = {node_of(cid): cid for cid in plan.clients}
        log.info("round %d open: %d nodes, deadline in %.0f s", plan.round, len(nodes),
                 plan.deadline - plan.opened_at)
        messages = [instruction(codec.train_instruction(self._instruction(plan, cid)),
                                MessageType.TRAIN, node, str(plan.round), plan.deadline - plan.opened_at)
                    for node, cid in nodes.items()]
        sent = self.clock()
        replies = list(grid.send_and_receive(messages, timeout=max(0.0, plan.deadline - sent)))
        wall = self.clock() - sent
        reported, failed, timings = self._collect(plan, replies)
        failed |= set(nodes) - reported - {r.metadata.src_node_id for r in replies}
        for node in sorted(failed):
            self._drop(node, "its TRAIN message failed or was not answered by the deadline")
        closure = engine.decide_close(self.clock())
        engine.apply_close(closure)
        if closure.delta is not None:
            self.history.append(closure.delta)
        self._save()
        entry = RoundLog(plan.round, closure.outcome.status,
                         {node: plan.clients[cid].blocks for node, cid in nodes.items()},
                         tuple(sorted(reported)), tuple(sorted(failed)), wall, tuple(timings),
                         engine.version, closure.outcome.loss)
        self.rounds.append(entry)
        if self.on_round is not None:
            self.on_round(entry)
        level, line = closed_round_line(closure, engine)
        log.log(level, "%s (%.2f s)", line, wall)
        return entry

    # ------------------------------------------------------------------ membership

    def _admit(self, grid: Grid) -> None:
        """Query profiles of new nodes; forget members that left the grid."""
        engine, now = self.engine, self.clock()
        present = set(grid.get_node_ids())
        for cid in [cid for cid in engine.members if node_of(cid) not in present]:
            engine.drop_member(cid)
            log.info("%s left the grid", cid)
        for member in engine.members.values():
            engine.mark_seen(member, now)
        members = {node_of(cid) for cid in engine.members}
        new = sorted(n for n in present if n not in members and n not in self.refused)
        if not new:
            return
        run = engine.config.run
        query = codec.profile_query(codec.ProfileQuery(run.batch_size, run.seq_len))
        messages = [instruction(query, MessageType.QUERY, n, "profile", self.settings.query_timeout_s)
                    for n in new]
        replies = grid.send_and_receive(messages, timeout=self.settings.query_timeout_s)
        admitted = []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise SchemaError(f"the node failed the query: {reply.error.reason}")
                profile, partition = codec.read_profile(reply.content)
                engine.check_registration(profile)
            except (SchemaError, Refusal) as exc:
                self.refused[node] = str(exc)
                log.warning("node %d not admitted: %s", node, exc)
                continue
            admitted.append((client_id(node, partition), node, profile))
        # Members join in client-id (partition) order, the order zorba_sim's clients have,
        # not in the order the replies arrived.
        for cid, node, profile in sorted(admitted, key=lambda a: a[0]):
            engine.pin_first(profile)
            engine.add_member(Member.joining(cid, profile, self.clock()))
            log.info("node %d joined: %.0f MiB budget, %.3f s a step", node,
                     profile.memory_budget_bytes / 2**20, profile.step_time_s)
        self._save()

    def _drop(self, node: int, why: str) -> None:
        for cid in [cid for cid in self.engine.members if node_of(cid) == node]:
            self.engine.drop_member(cid)
        self.refused[node] = why
        log.warning("node %d dropped: %s", node, why)

    # ------------------------------------------------------------------ a round's messages

    def _instruction(self, plan: RoundPlan, cid: str) -> codec.TrainInstruction:
        engine = self.engine
        if len(self.history) != engine.version:
            raise RuntimeError(f"the loop holds {len(self.history)} published deltas but the "
                               f"table is at version {engine.version}: the checkpoint lost some")
        return codec.TrainInstruction(engine.run_info(self.settings.run_id),
                                      plan.assignment_for(cid, self.clock()), tuple(self.history))

    def _collect(self, plan: RoundPlan, replies: Sequence[Message]
                 ) -> tuple[set[int], set[int], list[NodeTiming]]:
        reported: set[int] = set()
        failed: set[int] = set()
        timings: list[NodeTiming] = []
        asked = {node_of(cid): cid for cid in plan.clients}
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = asked.get(node)
            if cid is None:
                # The SuperLink answers for a node it lost with an error of its own (source:
                # the SuperLink): that node counts as unanswered, which drops it.
                log.warning("round %d: a reply from %d, which was not asked: %s", plan.round, node,
                            reply.error.reason if reply.has_error() else "(content ignored)")
                continue
            if reply.has_error():
                log.warning("node %d: round %d failed: %s", node, plan.round, reply.error.reason)
                failed.add(node)
                continue
            try:
                answer = codec.read_train_reply(reply.content)
                if isinstance(answer, codec.Decline):
                    log.info("node %d declined round %d: %s", node, plan.round, answer.reason)
                    continue
                now = self.clock()
                self.engine.check_report(cid, plan.round, answer, now)
            except (SchemaError, Refusal) as exc:
                log.warning("node %d: report for round %d refused: %s", node, plan.round, exc)
                continue
            self.engine.accept_report(ReceivedReport(cid, answer, report_hash(plan.round, answer), now))
            reported.add(node)
            timing = codec.read_timing(reply.content)
            if timing is not None:
                timings.append(NodeTiming(node, timing.handler_s, timing.train_s,
                                          timing.rss_peak_bytes))
        return reported, failed, timings

    def _save(self) -> None:
        checkpoint.save(self.engine, self.settings.checkpoint, self.settings.run_id, self.plans,
                        self.history)

