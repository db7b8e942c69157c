"""From command-line choices to the objects the daemon runs: model source, data, profile.

Everything here is plain construction; the decisions (what fits, when to train) live in
admission.py, profiling.py and daemon.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zorba_common.errors import DTypeError
from zorba_common.memory_model import MemorySettings, ModelFootprint, measured_runtime_bytes
from zorba_common.messages import DeviceProfile, MemoryProfile, RegisterRequest, RunInfo, TaskProbe
from zorba_common.run_defaults import CPU_FROZEN_DTYPE, CUDA_FROZEN_DTYPE
from zorba_edge.client.admission import Admission, admit
from zorba_edge.client.byte_sizes import format_size
from zorba_edge.client.errors import BudgetError, UsageError
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.profiling import (
    Budget,
    DeviceSurvey,
    StepTiming,
    process_rss,
    synchronizer,
    time_call,
)
from zorba_edge.client.progress import LOG_INTERVAL_S
from zorba_edge.client.state import DriftRecord, StateStore
from zorba_edge.data.examples import ClassificationExample, Example
from zorba_edge.data.jsonl import jsonl_task_kind, load_classification_jsonl, load_generation_jsonl
from zorba_edge.data.movie_reviews import load_movie_reviews
from zorba_edge.data.splits import dirichlet_label_split, train_heldout_split
from zorba_edge.data.templates import SENTIMENT_TEMPLATE, PromptTemplate
from zorba_edge.engine.drift_tolerance import PROBE_SETTINGS, DriftProbe
from zorba_edge.engine.drift_tolerance import probe as drift_probe
from zorba_edge.engine.fluency import generic_batch
from zorba_edge.engine.step_probe import StepProbe
from zorba_edge.engine.step_probe import probe as step_probe
from zorba_edge.model.base_rms import BlockRMS
from zorba_edge.model.loading import LoadConfig, LoadedModel, load_model, release_freed_memory
from zorba_edge.model.pretrained import packaged_model_path
from zorba_edge.model.progress import Progress
from zorba_edge.model.quantize import require_bitsandbytes
from zorba_edge.model.skeleton import build_skeleton, model_footprint
from zorba_edge.model.sources import FileSource, ModelSource, open_source

log = logging.getLogger("zorba_edge.client")

MOVIE_REVIEWS = "movie-reviews"
PROBE_BATCH_SIZE, PROBE_SEQ_LEN = MemorySettings.batch_size, MemorySettings.seq_len
"""The batch shape assumed before a run says its own (the server's defaults too)."""


# ------------------------------------------------------------------------------ model


def open_model(path: str | None, tokenizer_dir: str | None = None) -> FileSource:
    """`--model PATH` (a transformers directory or a .gguf), by default the packaged SmolLM2;
    `--tokenizer DIR` in place of the model's own tokenizer."""
    location = path if path is not None else packaged_model_path()
    # Nothing here to count in a progress bar, yet a GGUF's metadata (Gemma 3's 262k-piece
    # vocabulary, parsed once by the gguf package) takes 15 s of CPU or more on a small
    # machine: say what the wait is, and how long it was when it was long.
    log.info("opening the model at %s", location)
    started = time.monotonic()
    source = open_source(location, tokenizer_dir)
    if (elapsed := time.monotonic() - started) >= LOG_INTERVAL_S:
        log.info("model opened in %.0f s", elapsed)
    return source


def default_frozen_dtype(device: str) -> str:
    """CUDA_FROZEN_DTYPE (nf4) on CUDA where bitsandbytes works; CPU_FROZEN_DTYPE (bf16)
    elsewhere (zorba_common.run_defaults says why).

    Not for speed: on CPU nf4 is no slower here (README, "Frozen blocks on CPU"). On CPU the
    frozen layers dequantise to the activations' dtype for every product.
    """
    if torch.device(device).type != "cuda":
        return CPU_FROZEN_DTYPE
    try:
        require_bitsandbytes(CUDA_FROZEN_DTYPE)
    except DTypeError:
        return CPU_FROZEN_DTYPE
    return CUDA_FROZEN_DTYPE


def footprint_of(source: ModelSource) -> ModelFootprint:
    """Parameter counts from a meta-device skeleton: nothing is loaded."""
    return model_footprint(build_skeleton(source.config))


def memory_profile(load_config: LoadConfig, runtime_bytes: int | None) -> MemoryProfile:
    """How this device holds the model, as the memory model needs it.

    The round snapshot is spilled to disk (zorba_edge.engine.snapshot): it counts against no
    memory budget, so the profile declares none.
    """
    profile = MemoryProfile(
        train_dtype=load_config.train_dtype,
        frozen_dtype=load_config.frozen_dtype,
        frozen_other_dtype=load_config.train_dtype,
        embed_dtype=load_config.held_embed_dtype,
        snapshot_dtype=None,
    )
    # Without a measurement the profile keeps its default runtime allowance.
    if runtime_bytes is None:
        return profile
    return dataclasses.replace(profile, runtime_bytes=runtime_bytes)


@dataclass(frozen=True)
class LoadProbe:
    """What the timing probe found: the step time, and the memory of the process holding the
    model as it will be held."""

    timing: StepTiming
    held_bytes: int | None
    """Resident memory of this process with the model loaded (every block frozen) after the
    timed forward passes, freed pages handed back; None off the CPU, where the budget is the
    device's memory, not the process's."""


def probe_step_time(source: ModelSource, load_config: LoadConfig, *, repeats: int = 3,
                    batch_size: int = PROBE_BATCH_SIZE, seq_len: int = PROBE_SEQ_LEN,
                    progress: Progress | None = None, rms: BlockRMS | None = None) -> LoadProbe:
    """Load the model as it will be held (every block frozen), time its forward pass and
    measure what the process then holds (the memory profile's runtime, `measured_memory`).

    `progress` counts the loaded parts (blocks + 1) and then the timed forward passes; `rms`
    records each block's base RMS as the load reads it (the profile's `base_rms`)."""
    loading = int(source.config.num_hidden_layers) + 1
    timed = repeats + 1  # time_call's one warm-up call

    def loaded(done: int, _: int) -> None:
        if progress is not None:
            progress(done, loading + timed)

    def forwarded(done: int, _: int) -> None:
        if progress is not None:
            progress(loading + done, loading + timed)

    materialize = rms.reading(source.block_state_dict) if rms is not None else None
    model = load_model(source, (), load_config, materialize=materialize, progress=loaded).model
    try:
        timing = time_forward(model, int(source.config.vocab_size), load_config.device,
                              repeats=repeats, batch_size=batch_size, seq_len=seq_len,
                              progress=forwarded)
        held = None
        if torch.device(load_config.device).type == "cpu":
            release_freed_memory()  # as after every round: what the process holds, not its peak
            held = process_rss()
        return LoadProbe(timing, held)
    finally:
        del model
        release_freed_memory()
        if torch.device(load_config.device).type == "cuda":
            torch.cuda.empty_cache()


def measured_memory(memory: MemoryProfile, footprint: ModelFootprint, probe: LoadProbe) -> MemoryProfile:
    """`memory` with the runtime the probe measured (`measured_runtime_bytes`): the process's
    resident memory with the model loaded, less the weights the memory model counts. A reading
    before the load missed what loading and running the model add (~6% of a SmolLM2 client's
    peak, docs/design.md §4). Unchanged where the probe measured nothing (off the CPU)."""
    if probe.held_bytes is None:
        return memory
    settings = memory.settings(PROBE_BATCH_SIZE, PROBE_SEQ_LEN)
    runtime = measured_runtime_bytes(footprint, settings, probe.held_bytes)
    return dataclasses.replace(memory, runtime_bytes=max(runtime, memory.runtime_bytes))


def drift_probe_key(source: ModelSource, load_config: LoadConfig, *,
                    seq_len: int = PROBE_SEQ_LEN) -> str:
    """What determines the drift probe's result, as one digest: the model (its fingerprint),
    the precisions it is held in, the device type, the probe's settings and the very tokens
    it measures on (the packaged text as this tokenizer cuts it into rows of `seq_len`)."""
    tokens = generic_batch(source.tokenizer(), seq_len).input_ids
    what = {
        "model": source.fingerprint,
        "train_dtype": load_config.train_dtype,
        "embed_dtype": load_config.held_embed_dtype,
        "device": torch.device(load_config.device).type,
        "probe": dataclasses.asdict(PROBE_SETTINGS),
        "tokens": hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def cached_drift_tolerance(source: ModelSource, load_config: LoadConfig, store: StateStore, *,
                           budget_bytes: int | None = None,
                           seq_len: int = PROBE_SEQ_LEN) -> DriftProbe | None:
    """The drift probe kept in the state file for this model and setting, else measured now
    (`probe_drift_tolerance`) and kept: a restart or re-registration does not probe again."""
    key = drift_probe_key(source, load_config, seq_len=seq_len)
    kept = store.cached_drift(key)
    if kept is not None:
        log.info("drift probe: reusing the measurement kept in %s (same model and settings)",
                 store.path.name)
        return DriftProbe(kept.base_loss, kept.move, kept.rises)
    measured = probe_drift_tolerance(source, load_config, budget_bytes=budget_bytes,
                                     seq_len=seq_len)
    if measured is not None:
        store.keep_drift(DriftRecord(key, measured.base_loss, measured.move, measured.rises))
    return measured


def probe_drift_tolerance(source: ModelSource, load_config: LoadConfig, *,
                          budget_bytes: int | None = None,
                          seq_len: int = PROBE_SEQ_LEN) -> DriftProbe | None:
    """The model's fluency curvature (zorba_edge/engine/drift_tolerance.py): its generic-text
    loss under random drift of every block, the profile's `fluency_curvature`. The probe moves
    every block in place, so it loads them all at the training precision: where that would not
    fit `budget_bytes` (the weights at 4 bytes a parameter, with a quarter more for the
    forward), it measures nothing (None) and the server runs without this client's value."""
    if not _every_block_fits(source, budget_bytes, "drift probe"):
        return None
    loaded = _every_block(source, load_config)
    try:
        device = torch.device(load_config.device)
        batch = generic_batch(source.tokenizer(), seq_len).to(device)
        blocks = {b: loaded.trainable_parameters(b) for b in range(loaded.num_blocks)}
        return drift_probe(loaded.model, blocks, batch, **dataclasses.asdict(PROBE_SETTINGS))
    finally:
        del loaded
        release_freed_memory()
        if torch.device(load_config.device).type == "cuda":
            torch.cuda.empty_cache()


def probe_task_step(source: ModelSource, load_config: LoadConfig, task: LocalTask, *,
                    budget_bytes: int | None = None, batch_size: int = PROBE_BATCH_SIZE,
                    seq_len: int = PROBE_SEQ_LEN) -> StepProbe | None:
    """The task loss's gradient, signal and curvature around the base model on two of this
    client's training batches (zorba_edge/engine/step_probe.py), the profile's `task_probe`.
    It moves every block, as the drift probe does, so it measures nothing (None) where they do
    not fit `budget_bytes` at the training precision. A copy of `task` draws the batches (the
    client's own stream is left where it was); its seed also picks the directions, so the
    clients of a run measure different ones and their median averages over more."""
    if not _every_block_fits(source, budget_bytes, "task probe"):
        return None
    loaded = _every_block(source, load_config)
    try:
        device = torch.device(load_config.device)
        copy = LocalTask(task.examples, task.tokenizer, task.template, seed=task.seed)
        batches = (copy.next_batch(batch_size, seq_len).to(device),
                   copy.next_batch(batch_size, seq_len).to(device))
        blocks = {b: loaded.trainable_parameters(b) for b in range(loaded.num_blocks)}
        return step_probe(loaded.model, blocks, task.loss_fn, batches, batch_size, seed=task.seed)
    finally:
        del loaded
        release_freed_memory()
        if torch.device(load_config.device).type == "cuda":
            torch.cuda.empty_cache()


def _every_block_fits(source: ModelSource, budget_bytes: int | None, probe: str) -> bool:
    """Whether every block at the training precision (4 bytes a parameter, with a quarter
    more for the forward) fits `budget_bytes`; logs that `probe` is skipped where not."""
    footprint = footprint_of(source)
    weights = (sum(footprint.block_params) + footprint.embed_head_params) * 4
    if budget_bytes is not None and weights * 5 // 4 > budget_bytes:
        log.info("%s skipped: every block at the training precision (%s) does not fit the "
                 "budget", probe, format_size(weights))
        return False
    return True


def _every_block(source: ModelSource, load_config: LoadConfig) -> LoadedModel:
    """The model with every block trainable at the training precision (the probes' copy)."""
    frozen = dataclasses.replace(load_config, frozen_dtype=load_config.train_dtype)
    return load_model(source, range(int(source.config.num_hidden_layers)), frozen)


def time_forward(model: torch.nn.Module, vocab_size: int, device: str, *, repeats: int,
                 batch_size: int, seq_len: int, progress: Progress | None = None) -> StepTiming:
    """Median forward time of `model` on a seeded random batch of the given shape."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    mask = torch.ones_like(ids)

    def forward() -> object:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).logits

    return time_call(forward, repeats=repeats, synchronize=synchronizer(device), progress=progress)


@dataclass(frozen=True)
class DeviceReport:
    """What `zorba-edge profile` prints and `run` registers."""

    survey: DeviceSurvey
    budget: Budget
    admission: Admission | None
    """None where measured without refusing (`run`, before the run's shape is known) and
    no block fits at the probe's shape."""
    memory: MemoryProfile
    footprint: ModelFootprint
    fingerprint: str
    step_time_s: float | None


def device_report(source: ModelSource, load_config: LoadConfig, survey: DeviceSurvey,
                  budget: Budget, memory: MemoryProfile, *, step_time_s: float | None,
                  batch_size: int = PROBE_BATCH_SIZE, seq_len: int = PROBE_SEQ_LEN,
                  refuse: bool = True) -> DeviceReport:
    """Admission of this device for a run of the given batch shape: BudgetError if none, or
    with `refuse=False` a report whose admission is None."""
    footprint = footprint_of(source)
    admission: Admission | None
    try:
        admission = admit(footprint, memory.settings(batch_size, seq_len), budget.budget_bytes)
    except BudgetError:
        if refuse:
            raise
        admission = None
    return DeviceReport(survey, budget, admission, memory, footprint, source.fingerprint,
                        step_time_s)


def registration(report: DeviceReport, *, device_type: str, num_samples: int, secret: str,
                 name: str = "", base_rms: tuple[float, ...] | None = None,
                 fluency_curvature: float | None = None,
                 task_probe: TaskProbe | None = None) -> RegisterRequest:
    if report.step_time_s is None:
        raise ValueError("a registration needs a measured step time")
    profile = DeviceProfile(
        device_type=device_type,
        memory_budget_bytes=report.budget.budget_bytes,
        step_time_s=report.step_time_s,
        num_samples=num_samples,
        footprint=report.footprint,
        model_fingerprint=report.fingerprint,
        memory=report.memory,
        name=(name or socket.gethostname())[:256],
        base_rms=base_rms,
        fluency_curvature=fluency_curvature,
        task_probe=task_probe,
    )
    return RegisterRequest(secret, profile)


def check_run(run: RunInfo, source: ModelSource, memory: MemoryProfile, budget_bytes: int) -> None:
    """This device can take part in `run`: the same base model, and room for a block."""
    check_model(run, source)
    settings = memory.settings(run.hyper.batch_size, run.hyper.seq_len)
    admit(footprint_of(source), settings, budget_bytes)


def check_model(run: RunInfo, source: ModelSource) -> None:
    """The run trains the model this client loaded."""
    if run.model_fingerprint != source.fingerprint:
        raise UsageError(
            f"run {run.run_id} trains the model with fingerprint {run.model_fingerprint[:16]}..., "
            f"this client loaded {source.fingerprint[:16]}...: pass the run's base model with "
            "--model, or use another --state file to join a different run")


# ------------------------------------------------------------------------------ data

ENROLMENT_SECRET_ENV = "ZORBA_ENROLMENT_SECRET"


def read_secret(secret_file: str | None) -> str:
    """The run's enrolment secret, from a file or the environment (never a flag: `ps` shows it)."""
    if secret_file is not None:
        try:
            secret = Path(secret_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(
                f"--enrolment-secret-file {secret_file}: cannot read it ({exc.strerror})") from None
    else:
        secret = os.environ.get(ENROLMENT_SECRET_ENV, "").strip()
    if not secret:
        raise UsageError(
            "registering needs the run's enrolment secret: put it in a file and pass "
            f"--enrolment-secret-file FILE, or set {ENROLMENT_SECRET_ENV}")
    return secret


@dataclass(frozen=True)
class DataChoice:
    """Which examples this client trains (or evaluates) on."""

    spec: str
    """A JSONL file, or `movie-reviews` for the built-in corpus."""
    num_clients: int = 1
    client_index: int = 0
    dirichlet_alpha: float = 0.5
    """Label skew of the split across clients (small: each client sees mostly one label)."""
    seed: int = 0
    heldout_fraction: float = 0.1
    """movie-reviews: the share kept out of every client's training data, for `eval`."""
    max_examples: int | None = None
    template: PromptTemplate = SENTIMENT_TEMPLATE

    def __post_init__(self) -> None:
        if self.num_clients < 1 or not 0 <= self.client_index < self.num_clients:
            raise UsageError(
                f"--client-index {self.client_index} with --num-clients {self.num_clients}: the "
                "index must be in 0..num_clients-1")
        if self.max_examples is not None and self.max_examples < 1:
            raise UsageError("--max-examples must be at least 1")

    @property
    def is_movie_reviews(self) -> bool:
        return self.spec == MOVIE_REVIEWS


def make_template(label_names: Sequence[str] | None, label_words: Sequence[str] | None,
                  suffix: str | None, prefix: str | None) -> PromptTemplate:
    """SENTIMENT_TEMPLATE, or a template from --labels/--label-words/--prompt-suffix."""
    if label_names is None and label_words is None and suffix is None and prefix is None:
        return SENTIMENT_TEMPLATE
    base = SENTIMENT_TEMPLATE
    names = tuple(label_names) if label_names else base.label_names
    words = tuple(label_words) if label_words else base.label_words
    try:
        return PromptTemplate(names, words, suffix=base.suffix if suffix is None else suffix,
                              prefix=base.prefix if prefix is None else prefix)
    except ValueError as exc:
        raise UsageError(f"--labels/--label-words: {exc}") from None


def _all_examples(choice: DataChoice) -> list[Example]:
    if choice.is_movie_reviews:
        return list(load_movie_reviews())
    kind = jsonl_task_kind(choice.spec)
    if kind == "classification":
        return list(load_classification_jsonl(choice.spec, choice.template.label_names))
    return list(load_generation_jsonl(choice.spec))


def _client_share(examples: list[Example], choice: DataChoice) -> list[Example]:
    if choice.num_clients == 1:
        return examples
    if isinstance(examples[0], ClassificationExample):
        labels = [e.label for e in examples]  # type: ignore[union-attr]
        parts = dirichlet_label_split(labels, choice.num_clients, choice.dirichlet_alpha,
                                      choice.seed)
    else:
        order = np.random.default_rng(choice.seed).permutation(len(examples))
        parts = [np.sort(p) for p in np.array_split(order, choice.num_clients)]
    return [examples[i] for i in parts[choice.client_index]]


def _limit(examples: list[Example], choice: DataChoice) -> list[Example]:
    if choice.max_examples is None or len(examples) <= choice.max_examples:
        return examples
    order = np.random.default_rng([choice.seed, 1]).permutation(len(examples))
    keep = np.sort(order[: choice.max_examples])
    return [examples[i] for i in keep]


def training_examples(choice: DataChoice) -> list[Example]:
    """This client's share of the training data."""
    examples = _all_examples(choice)
    if choice.is_movie_reviews:
        train, _ = train_heldout_split(len(examples), choice.heldout_fraction, choice.seed)
        examples = [examples[i] for i in train]
    return _limit(_client_share(examples, choice), choice)


def heldout_examples(choice: DataChoice) -> list[Example]:
    """The evaluation examples: movie-reviews' held-out split, or the whole given file."""
    examples = _all_examples(choice)
    if choice.is_movie_reviews:
        _, heldout = train_heldout_split(len(examples), choice.heldout_fraction, choice.seed)
        examples = [examples[i] for i in heldout]
    return _limit(examples, choice)


def client_task_seed(data_seed: int, client_index: int) -> int:
    """Each client draws its own batch order: the seed mixes in its index (real clients and
    the simulator's virtual ones alike)."""
    return data_seed * 1_000_003 + client_index


def build_task(examples: Sequence[Example], source: ModelSource, choice: DataChoice) -> LocalTask:
    return LocalTask(list(examples), source.tokenizer(), choice.template,
                     seed=client_task_seed(choice.seed, choice.client_index))
