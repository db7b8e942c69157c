"""What one Flower node does with zorba messages, free of Flower itself.

The worker lives as long as its process: a Simulation Engine actor keeps it (and the model)
between messages, whichever node a message is for; a Deployment Engine node starts a fresh
process per message and builds it anew every round (docs/flower.md has what that costs),
unless the node hands its messages to a long-lived local worker process that keeps one
(`zorba_flower.worker`).

Sync: every TRAIN message carries the run's whole history (each published delta, versions
1..v); the worker's `HistoryTrainer` applies the versions it has not seen in place, and builds
any block it lacks by replaying the history from base, so the weights a round trains on are
a function of the history alone (zorba_sim's weights, bit for bit, where every block is held
in fp32), whichever actor or process serves the node. Batches come from the client's one
seeded stream, the daemon's and the simulator's (`build_task`: seeded by data seed and
partition, epoch-wise shuffled over the whole run); how far the node has drawn from it
lives in the node's own Flower state, not in the process, so a fresh process or another
actor carries on where the last one stopped. Both make a run reproducible across Flower's
placements.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from zorba_common.messages import DeviceProfile, Report
from zorba_edge.client.assembly import (
    DataChoice,
    build_task,
    footprint_of,
    memory_profile,
    probe_step_time,
    training_examples,
)
from zorba_edge.client.local_task import LocalTask
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import ModelSource, open_source
from zorba_flower.codec import Decline, ProfileQuery, Timing, TrainInstruction, TrainOutcome
from zorba_flower.history_trainer import HistoryTrainer
from zorba_flower.settings import ClientAppSettings


def rss_peak_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class NodeWorker:
    """Per process: the model source, each partition's task (examples and batch stream), and
    one trainer."""

    sources: dict[str, ModelSource] = field(default_factory=dict)
    tasks: dict[tuple[str, str, int, int, int], LocalTask] = field(default_factory=dict)
    trainer: HistoryTrainer | None = None

    def _source(self, path: str) -> ModelSource:
        if path not in self.sources:
            self.sources[path] = open_source(path)
        return self.sources[path]

    def _task(self, s: ClientAppSettings) -> LocalTask:
        """The partition's examples and batch stream, as the daemon's client `partition` of
        `num_partitions` builds them (one definition: `training_examples`, `build_task`)."""
        key = (s.model, s.data, s.num_partitions, s.partition_id, s.data_seed)
        if key not in self.tasks:
            choice = DataChoice(s.data, num_clients=s.num_partitions, client_index=s.partition_id,
                                seed=s.data_seed)
            self.tasks[key] = build_task(training_examples(choice), self._source(s.model), choice)
        return self.tasks[key]

    @staticmethod
    def _load_config(s: ClientAppSettings) -> LoadConfig:
        return LoadConfig(train_dtype="fp32", frozen_dtype=s.frozen_dtype, device="cpu")

    def profile(self, s: ClientAppSettings, query: ProfileQuery) -> DeviceProfile:
        source = self._source(s.model)
        load_config = self._load_config(s)
        step_time = s.step_time_s
        if step_time is None:
            step_time = probe_step_time(source, load_config, batch_size=query.batch_size,
                                        seq_len=query.seq_len).timing.step_time_s
        return DeviceProfile(
            device_type="cpu", memory_budget_bytes=s.budget_bytes, step_time_s=step_time,
            num_samples=len(self._task(s).examples), footprint=footprint_of(source),
            model_fingerprint=source.fingerprint,
            memory=memory_profile(load_config, s.runtime_bytes), name=f"partition-{s.partition_id}")

    def train(self, s: ClientAppSettings, instruction: TrainInstruction,
              batches_drawn: int) -> TrainOutcome:
        """One round from the table the message carries, the batch stream standing at
        `batches_drawn` (what the node's state kept from its last round)."""
        started = time.perf_counter()
        source = self._source(s.model)
        run, assignment = instruction.run, instruction.assignment
        task = self._task(s)
        task.seek(run.hyper.batch_size, run.hyper.seq_len, batches_drawn)
        trainer = self.trainer
        load_config = self._load_config(s)
        if (trainer is None or trainer.run != run or trainer.source is not source
                or trainer.load_config != load_config):
            trainer = self.trainer = HistoryTrainer(source, load_config, run, task)
        trainer.follow(instruction.deltas)
        trainer.task = task
        cancel = threading.Event()
        timer = threading.Timer(max(0.0, assignment.deadline_in_s - s.deadline_margin_s), cancel.set)
        timer.start()
        train_started = time.perf_counter()
        try:
            outcome = trainer.train_round(assignment, cancel)
        finally:
            timer.cancel()
        done = time.perf_counter()
        timing = Timing(done - started, done - train_started, rss_peak_bytes())
        drawn = task.batches_drawn(run.hyper.batch_size)
        if not outcome.steps:
            answer: Report | Decline = Decline(
                f"no local step before the deadline (round {assignment.round})")
            return TrainOutcome(answer, timing, drawn)
        report = outcome.report(assignment, uuid.uuid4().hex)
        if not s.report_peak_memory:
            report = dataclasses.replace(report, peak_memory_bytes=0)
        return TrainOutcome(report, timing, drawn)
