"""What one Flower node does with zorba messages, free of Flower itself.

The worker lives as long as its process: a Simulation Engine actor keeps it (and the model)
between messages, whichever node a message is for; a Deployment Engine node starts a fresh
process per message and builds it anew every round (docs/flower.md has what that costs).

Sync: the held model is always rebuilt from base + the table the message carries whenever
the table's version moved, so the weights a round trains on are a pure function of the
table, whichever actor or process serves the node. Batches are drawn from a stream seeded
by (data seed, partition, round), so they do not depend on which process served earlier
rounds either. Both make a run reproducible across Flower's placements.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from zorba_edge.client.assembly import (
    DataChoice,
    footprint_of,
    memory_profile,
    probe_step_time,
    training_examples,
)
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.trainer import LocalTrainer
from zorba_edge.common.schema import DeviceProfile, Report
from zorba_edge.data.templates import SENTIMENT_TEMPLATE
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import ModelSource, open_source
from zorba_flower.codec import Decline, ProfileQuery, Timing, TrainInstruction
from zorba_flower.settings import ClientAppSettings


def rss_peak_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def round_batch_seed(data_seed: int, partition: int, round_: int) -> int:
    return int(np.random.SeedSequence([data_seed, partition, round_]).generate_state(1)[0])


@dataclass
class NodeWorker:
    """Per process: the model source, examples per partition, and one trainer."""

    sources: dict[str, ModelSource] = field(default_factory=dict)
    examples: dict[tuple[str, int, int, int], list] = field(default_factory=dict)
    trainer: LocalTrainer | None = None

    def _source(self, path: str) -> ModelSource:
        if path not in self.sources:
            self.sources[path] = open_source(path)
        return self.sources[path]

    def _examples(self, s: ClientAppSettings) -> list:
        key = (s.data, s.num_partitions, s.partition_id, s.data_seed)
        if key not in self.examples:
            choice = DataChoice(s.data, num_clients=s.num_partitions, client_index=s.partition_id,
                                seed=s.data_seed)
            self.examples[key] = training_examples(choice)
        return self.examples[key]

    @staticmethod
    def _load_config(s: ClientAppSettings) -> LoadConfig:
        return LoadConfig(train_dtype="fp32", frozen_dtype=s.frozen_dtype, device="cpu")

    def profile(self, s: ClientAppSettings, query: ProfileQuery) -> DeviceProfile:
        source = self._source(s.model)
        load_config = self._load_config(s)
        step_time = s.step_time_s
        if step_time is None:
            step_time = probe_step_time(source, load_config, batch_size=query.batch_size,
                                        seq_len=query.seq_len).step_time_s
        return DeviceProfile(
            device_type="cpu", memory_budget_bytes=s.budget_bytes, step_time_s=step_time,
            num_samples=len(self._examples(s)), footprint=footprint_of(source),
            model_fingerprint=source.fingerprint,
            memory=memory_profile(load_config, s.runtime_bytes), name=f"partition-{s.partition_id}")

    def train(self, s: ClientAppSettings, instruction: TrainInstruction) -> tuple[Report | Decline, Timing]:
        started = time.perf_counter()
        source = self._source(s.model)
        run, assignment, state = instruction.run, instruction.assignment, instruction.state
        trainer = self.trainer
        if trainer is None or trainer.run != run or trainer.source is not source:
            table = CoefficientTable(state.pool_size, state.num_blocks, state.matrix(), state.version)
            trainer = self.trainer = LocalTrainer(source, self._load_config(s), run,
                                                  self._task(s, source, assignment.round), table=table)
        elif trainer.table.version != state.version or not np.array_equal(trainer.table.values,
                                                                          state.matrix()):
            trainer.replace_table(state)
        trainer.task = self._task(s, source, assignment.round)
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
        if not outcome.steps:
            return Decline(f"no local step before the deadline (round {assignment.round})"), timing
        report = Report(uuid.uuid4().hex, assignment.base_version, outcome.steps, outcome.num_samples,
                        outcome.loss_mean, outcome.loss_last,
                        outcome.peak_memory_bytes if s.report_peak_memory else 0,
                        outcome.step_time_s)
        return report, timing

    def _task(self, s: ClientAppSettings, source: ModelSource, round_: int) -> LocalTask:
        return LocalTask(self._examples(s), source.tokenizer(), SENTIMENT_TEMPLATE,
                         seed=round_batch_seed(s.data_seed, s.partition_id, round_))
