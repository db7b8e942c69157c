"""N virtual devices over ONE loaded model, driving the real round engine and trainer.

Every client reverts to the global model when its round ends, so a virtual client is only
its device, its data shard, its batch order and its random stream; the simulator holds one
model with every block trainable in fp32 and, for each client in turn, runs the clients' own
local loop (`zorba_edge.client.trainer.run_local_steps`) on that client's assigned blocks.
Plans, report checks, aggregation and the coefficient table are the server's
(`zorba_server.engine.RoundEngine`); the published increments move the model exactly as a
client's sync does (`apply_increments_`). Nothing of the round logic is copied here. What
differs between modes is a `ClientTraining` (zorba_sim/client_training.py): fedavg's
clients run the real client's AdamW loop and the server's weight average instead
(zorba_sim/fedavg_clients.py).

Virtual time: a device's step takes `reference_step_s / speed`, where `reference_step_s` is
one step of this machine (measured at start unless given, then fixed, so the same seeds give
the same run). A client downloads its assignment and deltas, takes the steps that fit
before the round's deadline (leaving time for its upload), and reports; one that drops out
reports nothing. Messages are sized by encoding them with the wire schema.

Determinism: with a fixed `reference_step_s`, the same seeds give the same coefficient table
bit for bit; a checkpoint holds the engine, every client's batch order and random stream and
the model's weights, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from zorba_common.codec import encode
from zorba_common.fluency import broken
from zorba_common.messages import TRAIN, Assignment, DeviceProfile, MemoryProfile, NextRound, Report
from zorba_common.run_defaults import CENTRAL_MEZO, CPU_FROZEN_DTYPE, FEDZO_FULL
from zorba_edge.client.assembly import PROBE_SEQ_LEN, client_task_seed, footprint_of
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.readout_setup import client_readout
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.data.splits import dirichlet_label_split
from zorba_edge.data.templates import SENTIMENT_TEMPLATE, PromptTemplate
from zorba_edge.engine.bias_floor import FIT_EXAMPLES, bias_floor_accuracy, score_examples
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.engine.directions import BlockTensors
from zorba_edge.engine.drift_tolerance import probe as drift_probe
from zorba_edge.engine.fluency import generic_batch, generic_loss
from zorba_edge.engine.losses import evaluate_classification
from zorba_edge.engine.step_probe import probe as step_probe
from zorba_edge.model.base_rms import tensors_rms
from zorba_edge.model.loading import LoadConfig, LoadedModel, load_model
from zorba_edge.model.readout import LabelReadout
from zorba_edge.model.sources import ModelSource
from zorba_server.config import MAX_STEPS, ServerConfig
from zorba_server.drift import block_drift
from zorba_server.engine import RoundEngine
from zorba_server.errors import Refusal
from zorba_server.members import Member
from zorba_server.rounds import ReceivedReport
from zorba_sim.adversary import Adversary
from zorba_sim.client_training import ClientTraining, ZOClients
from zorba_sim.fedavg_clients import FedAvgClients
from zorba_sim.fleet import DeviceClass, DeviceGroup, Fleet, FleetError

CENTRAL_DEVICE = DeviceClass("central", 1 << 50, speed=1.0, upload_mbps=1e6, download_mbps=1e6,
                             source="one device holding all data and memory: no federation")
PROBED_CLIENTS = 4
"""With run.step_rule = probe, the clients whose data the simulator probes the task loss on
(the first ones: a fleet of thousands would spend its start-up probing)."""


@dataclass(frozen=True)
class SimulationConfig:
    server: ServerConfig
    """The engine's settings (run, aggregation, scheduler), as a server would be given them."""
    rounds: int = 20
    """Rounds to run (applied or not)."""
    reference_step_s: float | None = None
    """Virtual seconds of one step on a speed-1.0 device (in fedavg one AdamW step, in the
    zeroth-order modes one pool index); None: measured on this machine."""
    central: bool = False
    """central-mezo: one client holding all the data trains every block (the fleet is
    replaced); otherwise the mode is the server's `run.mode`."""
    dirichlet_alpha: float = 0.5
    data_seed: int = 0
    memory: MemoryProfile = MemoryProfile(frozen_dtype=CPU_FROZEN_DTYPE, frozen_other_dtype="fp32")
    """How every virtual device would hold the model (what its budget is checked against)."""
    eval_every: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.reference_step_s is not None and not self.reference_step_s > 0:
            raise ValueError(f"reference_step_s must be positive, got {self.reference_step_s}")

    @property
    def mode(self) -> str:
        """The simulated mode: the run's, or central-mezo."""
        return CENTRAL_MEZO if self.central else self.server.run.mode


@dataclass
class VirtualClient:
    client_id: str
    device: DeviceClass
    task: LocalTask
    rng: np.random.Generator
    """Its availability and dropout draws (never a global RNG)."""
    version: int = 0
    """The alpha version it last synced to (what its next download carries deltas from)."""


@dataclass
class RoundRecord:
    """One simulated round, as the results list it."""

    round: int
    status: str
    version: int
    assigned: int
    reports: int
    dropped: int
    stragglers: int
    virtual_time_s: float
    forwards: int
    """Forward passes spent by every client so far."""
    train_loss: float | None
    bytes_down: float
    bytes_up: float
    """Mean per assigned client."""
    wall_s: float
    accuracy: float | None = None
    eval_loss: float | None = None
    shrunk_batches: int = 0
    """Batches of this round whose step the trust region scaled down (every client)."""
    readout_shrunk_batches: int = 0
    """... and whose readout step its own region (run.readout_trust_radius) scaled down."""
    lr: float | None = None
    """The round's step size (run.lr after the loss guard's and the plateaus' cuts)."""
    loss_check: float | None = None
    """The reporting clients' `Report.loss_check` (check-batch loss at the round's base
    version), weighted as the loss guard weighs them."""
    generic_loss: float | None = None
    """Next-token loss on the packaged generic text, measured with the accuracy (the fluency
    watch)."""
    stopped: str | None = None
    """Why the run stopped after this round (the fluency watch), or None."""
    drift_max: float | None = None
    """The largest block drift of base + alpha after the round: |theta_b - theta0_b| /
    |theta0_b| (zorba_server/drift.py), in the zeroth-order modes."""


@dataclass
class Simulation:
    config: SimulationConfig
    source: ModelSource
    engine: RoundEngine
    loaded: LoadedModel
    clients: dict[str, VirtualClient]
    heldout: list[Any]
    """Held-out batches, evaluated after every `eval_every` rounds."""
    training: ClientTraining
    """How the mode's clients train and a closed round moves the model."""
    reference_step_s: float
    clock: float = 0.0
    forwards: int = 0
    records: list[RoundRecord] = field(default_factory=list)
    adversaries: dict[str, Adversary] = field(default_factory=dict)
    """Client id -> what replaces its honest report before the engine sees it
    (zorba_sim/adversary.py; empty: every client is honest). Not in checkpoints."""
    generic: Any = None
    """The generic-text batch the fluency watch scores (None: the watch is off)."""
    base_generic_loss: float | None = None
    fluent: tuple[int, np.ndarray] | None = None
    """The last evaluated version whose generic-text loss was within the tolerance, and its
    table: what the watch rolls back to (the base model's until a round is evaluated)."""

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, config: SimulationConfig, source: ModelSource, fleet: Fleet,
              train: Sequence[ClassificationExample], heldout: Sequence[ClassificationExample], *,
              template: PromptTemplate = SENTIMENT_TEMPLATE, eval_batch_size: int = 16) -> Simulation:
        server = config.server
        if config.central:
            fleet, server = central_mezo(fleet, server)
        config = dataclasses.replace(config, server=server)
        devices = fleet.devices()
        labels = [e.label for e in train]
        if len(devices) == 1:
            shards = [np.arange(len(train))]
        else:
            shards = dirichlet_label_split(labels, len(devices), config.dirichlet_alpha,
                                           config.data_seed, min_per_client=1)
        engine = RoundEngine(server)
        footprint = footprint_of(source)
        engine.pin(source.fingerprint, footprint)
        tokenizer = source.tokenizer()
        shared_collators: dict[int, Any] = {}
        clients: dict[str, VirtualClient] = {}
        placeholder = 1.0  # step times are set once reference_step_s is known
        for index, ((device, where), shard) in enumerate(zip(devices, shards, strict=True)):
            cid = f"v{index:06d}"
            task = LocalTask([train[int(i)] for i in shard], tokenizer, template,
                             seed=client_task_seed(config.data_seed, index))
            # One collator per shape for the whole fleet: a thousand clients, one tokenizer.
            task._collators = shared_collators
            profile = DeviceProfile(f"virtual:{device.name}", device.memory_budget_bytes,
                                    placeholder, len(shard), footprint, source.fingerprint,
                                    config.memory, name=device.name)
            try:
                engine.check_registration(profile)
            except Refusal as exc:
                raise FleetError(f"{where}: a {device.name} device cannot take part: {exc.message}; "
                                 "or raise its memory_budget") from None
            engine.add_member(Member(cid, profile, 0.0, 1.0, 0.0, placeholder))
            clients[cid] = VirtualClient(cid, device, task,
                                         np.random.default_rng([server.run.seed, config.data_seed, index]))
        loaded = load_model(source, range(footprint.num_blocks),
                            LoadConfig(train_dtype="fp32", frozen_dtype="fp32", device=config.device))
        run = server.run
        heldout_task = LocalTask(list(heldout), tokenizer, template)
        batches = [b.to(config.device) for b in heldout_task.batches(eval_batch_size, run.seq_len)]
        training: ClientTraining = (
            FedAvgClients(loaded, config.device) if engine.weights_only
            else ZOClients(loaded, run.seed, config.device,
                           _readout(loaded.model, engine, heldout_task)))
        sim = cls(config, source, engine, loaded, clients, batches, training, reference_step_s=0.0)
        if not engine.weights_only:
            # What run.max_drift is relative to; the watch's reference is the base model's loss.
            blocks = sim.all_blocks()
            engine.base_rms = _block_rms(blocks)
            if run.drift_budget > 0 and run.fluency_tolerance > 0:
                # The drift budget from the probe a real client runs at start-up, on the
                # simulator's one copy of the model (zorba_edge/engine/drift_tolerance.py).
                # It moves the run's own model and back, up to rounding: restored exactly, so
                # the run is bit for bit the one without the probe.
                params = [t for b in sorted(blocks) for _, t in blocks[b]]
                with _restored(params):
                    generic = generic_batch(tokenizer, PROBE_SEQ_LEN).to(config.device)
                    engine.fluency_curvature = drift_probe(loaded.model, blocks, generic).curvature
            if run.step_rule == "probe":
                # The task probe a real client runs at start-up (zorba_edge/engine/
                # step_probe.py), on the first clients' own data; restored exactly, as above.
                for cid in list(clients)[:PROBED_CLIENTS]:
                    task = clients[cid].task
                    copy = LocalTask(task.examples, tokenizer, template, seed=task.seed)
                    pair = (copy.next_batch(run.batch_size, run.seq_len).to(config.device),
                            copy.next_batch(run.batch_size, run.seq_len).to(config.device))
                    with _restored([t for b in sorted(blocks) for _, t in blocks[b]]):
                        probed = step_probe(loaded.model, blocks, task.loss_fn, pair, run.batch_size,
                                            seed=task.seed)
                    member = engine.members[cid]
                    member.profile = dataclasses.replace(member.profile, task_probe=probed.measured)
                engine.step_from_probes()
            if run.fluency_tolerance > 0:
                sim.generic = generic_batch(tokenizer, run.seq_len).to(config.device)
                sim.base_generic_loss = generic_loss(loaded.model, sim.generic)
                assert engine.alpha is not None
                sim.fluent = (0, engine.alpha.copy())
        sim.reference_step_s = config.reference_step_s or sim.measure_step_s()
        for cid, client in clients.items():
            step = sim.reference_step_s / client.device.speed
            member = engine.members[cid]
            member.profile = dataclasses.replace(member.profile, step_time_s=step)
            member.step_time_s = step
        return sim

    # ------------------------------------------------------------------ the model

    def all_blocks(self) -> BlockTensors:
        return {b: self.loaded.trainable_parameters(b) for b in range(self.loaded.num_blocks)}

    def checkpointed(self) -> BlockTensors:
        """What a checkpoint keeps of the model: every block, and what the clients hold beside
        them (the label readout's rows, block R)."""
        return {**self.all_blocks(), **self.training.held_beside_blocks()}

    def measure_step_s(self, steps: int = 3) -> float:
        """Median seconds of one step of the mode's local loop on this machine, every block
        held (on a probe copy of a client's task, so no client's batch order moves; the model
        is left as it was)."""
        client = next(iter(self.clients.values()))
        task = LocalTask(client.task.examples, client.task.tokenizer, client.task.template)
        info = self.engine.run_info("probe")
        return statistics.median(self.training.probe_step_s(task, self.engine, info)
                                 for _ in range(steps))

    def version_state(self) -> Any:
        """What brings the model back to the current version later (`move_to_version_`): the
        coefficient table in the zeroth-order modes, the weights themselves in fedavg."""
        return self.training.version_state(self.engine)

    def move_to_version_(self, current: Any, target: Any) -> None:
        """Move the model from one kept `version_state` to another."""
        self.training.move_to_version_(current, target)

    # ------------------------------------------------------------------ rounds

    def run(self, progress: Callable[[RoundRecord], None] | None = None,
            checkpoint_dir: Path | None = None, stop_after: int | None = None) -> list[RoundRecord]:
        """Run the remaining rounds (checkpointing after each when a folder is given)."""
        while len(self.records) < self.config.rounds and not (self.records and self.records[-1].stopped):
            record = self.run_round()
            if checkpoint_dir is not None:
                self.save_checkpoint(checkpoint_dir)
            if progress is not None:
                progress(record)
            if stop_after is not None and len(self.records) >= stop_after:
                break
        return self.records

    def run_round(self) -> RoundRecord:
        started = time.perf_counter()
        engine, run = self.engine, self.config.server.run
        now = self.clock
        for client in self.clients.values():
            online = client.rng.random() < client.device.availability
            member = engine.members[client.client_id]
            if online:
                engine.mark_seen(member, now)
            else:  # offline this round: the engine's "left" (its next round may bring it back)
                engine.mark_left(member)
        plan = engine.propose_round(now)
        if plan is None:
            self.clock = now + run.round_duration_s
            return self._record(len(self.records) + 1, "idle", 0, 0, 0, 0, None, 0.0, 0.0, started)
        engine.open_round(plan)
        training = self.training
        training.begin_round()
        info = engine.run_info("simulation")
        finished: dict[str, float] = {}
        losses: list[tuple[float, float]] = []
        checks: list[tuple[str, float]] = []
        dropped = stragglers = shrunk = readout_shrunk = 0
        down_total = up_total = 0.0
        for cid in sorted(plan.clients):
            client = self.clients[cid]
            assignment = plan.assignment_for(cid, now)
            deltas, catch_up = engine.deltas_since(client.version)
            down = len(encode(NextRound(TRAIN, engine.version, assignment, deltas, catch_up)))
            down += training.weights_down_bytes(cid, assignment)
            if catch_up:
                down += 8 * (engine.alpha.size if engine.alpha is not None else 0)
            client.version = engine.version
            step_s = self.reference_step_s / client.device.speed
            planned = len(assignment.pool_indices)
            reported_steps = 0 if engine.weights_only else planned  # fedavg reports none
            upload_s = _seconds(_report_bytes(assignment, reported_steps)
                                + training.weights_up_bytes(), client.device.upload_mbps)
            download_s = _seconds(down, client.device.download_mbps)
            room = assignment.deadline_in_s - download_s - upload_s
            fit = max(0, math.floor(room / step_s)) if room > 0 else 0
            # Both draws always happen, so one client's fate never shifts another's stream.
            drops = client.rng.random() < client.device.dropout
            drop_at = math.floor(client.rng.random() * planned)
            take = min(planned, fit, drop_at if drops else planned)
            stragglers += fit < planned
            outcome = training.train(cid, client.task, assignment, info, take, reports=not drops)
            self.forwards += outcome.forwards
            shrunk += outcome.shrunk_batches
            readout_shrunk += outcome.readout_shrunk_batches
            down_total += down
            if drops or not outcome.steps_taken:
                dropped += drops
                continue
            report = dataclasses.replace(outcome, step_time_s=step_s).report(
                assignment, f"{cid}:{plan.round}")
            adversary = self.adversaries.get(cid)
            if adversary is not None:
                report = adversary.transform(report)
            up = len(encode(report)) + training.weights_up_bytes()
            up_total += up
            done = now + download_s + outcome.steps_taken * step_s + _seconds(up, client.device.upload_mbps)
            try:
                engine.check_report(cid, plan.round, report, done)
            except Refusal as exc:
                if adversary is None:
                    raise  # an honest report refused is a bug, not an outcome
                adversary.refused.append((plan.round, exc.message))
                continue
            engine.accept_report(ReceivedReport(cid, report, b"", done))
            finished[cid] = done
            losses.append((float(report.num_samples), report.loss_mean))
            if report.loss_check is not None:
                checks.append((cid, report.loss_check))
        close_at = (max(finished.values()) if len(finished) == len(plan.clients)
                    else engine.closes_at(plan))
        closure = engine.decide_close(close_at)
        engine.apply_close(closure)
        training.close(closure, engine)
        self.clock = close_at
        assigned = len(plan.clients)
        # The guard's own weights (each member's data size), not the examples of this round.
        check_weights = engine.sample_weights(cid for cid, _ in checks)
        loss_check = _weighted_mean([(check_weights[cid], v) for cid, v in checks])
        return self._record(plan.round, closure.outcome.status, assigned, len(finished), dropped,
                            stragglers, _weighted_mean(losses), down_total / assigned,
                            up_total / assigned, started, shrunk, lr=plan.hyper.lr,
                            loss_check=loss_check, readout_shrunk_batches=readout_shrunk)

    def _record(self, round_: int, status: str, assigned: int, reports: int, dropped: int,
                stragglers: int, loss: float | None, down: float, up: float,
                started: float, shrunk_batches: int = 0, *, lr: float | None = None,
                loss_check: float | None = None, readout_shrunk_batches: int = 0) -> RoundRecord:
        record = RoundRecord(round_, status, self.engine.version, assigned, reports, dropped,
                             stragglers, self.clock, self.forwards, loss, down, up,
                             time.perf_counter() - started, shrunk_batches=shrunk_batches,
                             lr=lr, loss_check=loss_check,
                             readout_shrunk_batches=readout_shrunk_batches)
        published = record.version != (self.records[-1].version if self.records else 0)
        if self.engine.base_rms is not None and self.engine.alpha is not None:
            record.drift_max = float(block_drift(self.engine.body_alpha(), self.engine.base_rms).max())
        self.records.append(record)
        # Evaluated whenever the round moved the model: an applied round, or the loss guard's
        # rollback (a rejected round that publishes the way back).
        if published and (len(self.records) % self.config.eval_every == 0
                          or len(self.records) == self.config.rounds):
            record.accuracy, record.eval_loss = self.evaluate()
            self._watch_fluency(record)
        return record

    def _watch_fluency(self, record: RoundRecord) -> None:
        """Score the generic text; past the tolerance, roll the model and the table back to
        the last fluent version and stop the run, saying so in the record."""
        if self.generic is None or self.base_generic_loss is None or self.fluent is None:
            return
        record.generic_loss = generic_loss(self.loaded.model, self.generic)
        tolerance = self.config.server.run.fluency_tolerance
        if not broken(self.base_generic_loss, record.generic_loss, tolerance):
            assert self.engine.alpha is not None
            self.fluent = (record.version, self.engine.alpha.copy())
            return
        version, alpha = self.fluent
        self.move_to_version_(self.version_state(), alpha)
        self.engine.alpha = alpha.copy()
        record.stopped = (
            f"generation broke: the generic-text loss rose from {self.base_generic_loss:.4g} (base) "
            f"to {record.generic_loss:.4g} (version {record.version}), more than "
            f"{tolerance:.0%}; the table is rolled back to version {version}'s "
            "and the run stops (lower run.lr, or set run.max_drift)")
        record.accuracy, record.eval_loss = self.evaluate()

    def evaluate(self) -> tuple[float, float]:
        result = evaluate_classification(self.loaded.model, self.heldout)
        return result.accuracy, result.loss

    def bias_floor(self, fit_examples: int = FIT_EXAMPLES, batch_size: int = 16,
                   heldout: Sequence[Any] | None = None) -> float:
        """The held-out accuracy (on `heldout` batches, else the simulation's own) of the model
        as it stands with one offset per label fitted on a seeded sample of the clients'
        training examples (engine/bias_floor.py). Called on the base model, before a round
        moves it; no client's batch order moves."""
        examples = [e for client in self.clients.values() for e in client.task.examples]
        order = np.random.default_rng([self.config.data_seed, 1]).permutation(len(examples))
        some = next(iter(self.clients.values())).task
        task = LocalTask([examples[int(i)] for i in np.sort(order[:fit_examples])],
                         some.tokenizer, some.template)
        device = self.config.device
        fit = score_examples(self.loaded.model, (b.to(device) for b in
                                                 task.batches(batch_size, self.config.server.run.seq_len)))
        scored = score_examples(self.loaded.model, self.heldout if heldout is None else heldout)
        return bias_floor_accuracy(fit, scored)

    # ------------------------------------------------------------------ identity and checkpoints

    def alpha_hash(self) -> str:
        assert self.engine.alpha is not None
        return hashlib.sha256(np.ascontiguousarray(self.engine.alpha, dtype="<f8").tobytes()).hexdigest()

    def save_checkpoint(self, directory: Path) -> Path:
        """Write the state after the last round into `directory` (atomically: a kill at any
        moment leaves the previous checkpoint or this one, never a mix)."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"round-{len(self.records):06d}"
        partial = directory / (target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        state = {
            "engine": self.engine, "clock": self.clock, "forwards": self.forwards,
            "records": self.records, "reference_step_s": self.reference_step_s,
            "clients": {cid: (c.task._samplers, c.rng, c.version) for cid, c in self.clients.items()},
            "training": self.training.state(),
        }
        with open(partial / "state.pkl", "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        tensors = {f"{b}/{name}": t.detach().to("cpu").contiguous()
                   for b, named in self.checkpointed().items() for name, t in named}
        save_file(tensors, str(partial / "blocks.safetensors"))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        latest = directory / "LATEST"
        tmp = directory / "LATEST.tmp"
        tmp.write_text(target.name)
        os.replace(tmp, latest)
        for old in directory.glob("round-*"):
            if old != target and not old.name.endswith(".partial"):
                shutil.rmtree(old, ignore_errors=True)
        return target

    def load_checkpoint(self, directory: Path) -> bool:
        """Continue from the latest checkpoint in `directory`; False when there is none.

        The checkpoint is a pickle this simulator wrote: load only your own files."""
        latest = directory / "LATEST"
        if not latest.exists():
            return False
        folder = directory / latest.read_text().strip()
        with open(folder / "state.pkl", "rb") as f:
            state = pickle.load(f)  # noqa: S301 (our own checkpoint)
        if set(state["clients"]) != set(self.clients):
            raise FleetError(f"the checkpoint in {directory} is of another fleet "
                             f"({len(state['clients'])} devices, this one {len(self.clients)})")
        self.engine = state["engine"]
        self.clock, self.forwards = state["clock"], state["forwards"]
        self.records, self.reference_step_s = state["records"], state["reference_step_s"]
        self.training.restore(state.get("training"))
        for cid, (samplers, rng, version) in state["clients"].items():
            client = self.clients[cid]
            client.task._samplers, client.rng, client.version = samplers, rng, version
        saved = load_file(str(folder / "blocks.safetensors"))
        with torch.no_grad():
            for b, named in self.checkpointed().items():
                for name, tensor in named:
                    tensor.copy_(saved[f"{b}/{name}"])
        return True


@contextmanager
def _restored(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Put `params` back bit for bit after a probe that moved them and back up to rounding, so
    that the run is the one without the probe."""
    saved = [t.detach().clone() for t in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, kept in zip(params, saved, strict=True):
                t.copy_(kept)


def _block_rms(blocks: BlockTensors) -> tuple[float, ...]:
    """RMS of each block's weights, every tensor (what a direction perturbs): what a real
    client sends in its profile (zorba_edge/model/base_rms.py)."""
    return tuple(tensors_rms(t for _, t in blocks[b]) for b in sorted(blocks))


def central_mezo(fleet: Fleet, server: ServerConfig) -> tuple[Fleet, ServerConfig]:
    """The central-MeZO reference for `fleet`: one always-online device holding all the data
    and every block, with the fleet's compute (its devices' speeds summed, and their step
    allowance together), so that it spends about as many forward passes a round as the
    federation and a comparison at equal forward passes meets both mid-run. (With one
    device's compute it ran a quarter of the forwards of a 4-device federation, and "equal
    forwards" fell before the federation's first version.)"""
    devices = fleet.devices()
    device = dataclasses.replace(CENTRAL_DEVICE, speed=sum(d.speed for d, _ in devices))
    run = dataclasses.replace(server.run, mode=FEDZO_FULL,
                              max_steps=min(MAX_STEPS, server.run.max_steps * len(devices)))
    return (Fleet((DeviceGroup(device, 1, 0),), origin=CENTRAL_MEZO),
            dataclasses.replace(server, run=run))


def _report_bytes(assignment: Assignment, steps: int) -> int:
    """The encoded size of a report of `steps` steps (what the client must leave time for),
    with a readout scalar per readout pool index where the round measures the readout."""
    ks = tuple((k, 0.0) for k in assignment.pool_indices[:steps])
    readout = tuple((k, 0.0) for k in assignment.readout_pool_indices) or ks
    probe = Report(idempotency_key="x" * 32, base_version=assignment.base_version,
                   steps=ks, num_samples=1, loss_mean=0.0, loss_last=0.0, peak_memory_bytes=0,
                   step_time_s=1.0, readout_steps=readout if assignment.hyper.readout_directions else ())
    return len(encode(probe))


def _readout(model: torch.nn.Module, engine: RoundEngine, task: LocalTask) -> LabelReadout | None:
    """The label readout every virtual client holds where the run measures one (the fleet
    shares one template, so one readout; rows from the table's column R)."""
    assert engine.alpha is not None
    info = engine.run_info("simulation")
    table = CoefficientTable(engine.pool_size, engine.alpha.shape[1], engine.alpha, engine.version)
    return client_readout(model, info, task, table)


def _seconds(num_bytes: float, mbps: float) -> float:
    return 8.0 * num_bytes / (mbps * 1e6)


def _weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    weight = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / weight if weight else None
