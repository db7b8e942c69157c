"""Held-out accuracy after every applied round, replayed from the server's record.

Nothing is evaluated while a federation trains (evaluation would share the cores with the
clients and slow their rounds, so the modes would no longer train for the same wall time).
Afterwards one fp32 model is loaded with every block trainable and walked through the run's
versions in order:

- zeroth-order modes (zorba, zorba-uniform, fedzo-full): each version's alpha delta from the
  server's record (read through its `Store`, zorba_lab/record.py), applied exactly as a
  client syncs (`theta[b] -= d * z[k, b]`);
- fedavg: each version's global weights file, which the server keeps when the run is started
  with `keep_weight_versions` (the file format is zorba_common.weight_files).

Version 0 is the base model. Every n-th version (and always the last) is evaluated on the
held-out reviews the quickstart evaluates on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zorba_common.errors import ZorbaError
from zorba_common.messages import AlphaDelta
from zorba_common.readout import readout_block
from zorba_common.run_defaults import FEDAVG, RUN_MODES
from zorba_common.weight_files import default_weights_dir, parse_key, version_path
from zorba_edge.data.batches import IGNORE_INDEX
from zorba_edge.engine.coefficients import AlphaIncrement, apply_increments_
from zorba_edge.engine.directions import BlockTensors, NamedTensors
from zorba_edge.engine.losses import evaluate_classification
from zorba_edge.model.loading import LoadConfig, LoadedModel, load_model
from zorba_edge.model.readout import LabelReadout, attach_readout
from zorba_lab.record import RecordError, read_record

if TYPE_CHECKING:
    from zorba_edge.data.batches import ClassificationBatch
    from zorba_edge.model.sources import ModelSource
    from zorba_lab.federation import FederationPlan

REPLAY_LOAD = LoadConfig(train_dtype="fp32", frozen_dtype="fp32", device="cpu")
"""Every block in fp32, as the quickstart evaluates: nf4 would round away small ZO updates."""


class ReplayError(ZorbaError):
    """The server's record cannot be replayed (a version or its weights are missing)."""


@dataclass(frozen=True)
class AppliedVersion:
    """One applied round of the record: the alpha version it produced."""

    version: int
    round: int
    closed_at: float | None
    delta: AlphaDelta
    """As stored (empty in fedavg, whose training is weights)."""


@dataclass(frozen=True)
class ReplayPoint:
    version: int
    round: int
    """The round that produced this version (0 for the base model)."""
    closed_at: float | None
    """When that round closed (server clock, unix seconds); None for the base model."""
    accuracy: float
    loss: float
    eval_s: float
    """Seconds this evaluation took (the replay's cost, not training time)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Replay:
    points: list[ReplayPoint]
    load_s: float
    """Loading the fp32 model once."""
    apply_s: float
    """Bringing the model from version to version (deltas or weight files), in total."""


# ---------------------------------------------------------------------------- the record


def run_seed(db_path: Path | str) -> int:
    """The run seed that, with (k, b), defines every perturbation direction of the run."""
    try:
        return read_record(db_path).snapshot.seed
    except RecordError as exc:
        raise ReplayError(str(exc)) from None


def applied_versions(db_path: Path | str) -> list[AppliedVersion]:
    """Versions 1..N in order, each with its round, close time and delta."""
    try:
        snapshot = read_record(db_path).snapshot
    except RecordError as exc:
        raise ReplayError(str(exc)) from None
    closed_at = {r.plan.round: r.closed_at for r in snapshot.rounds}
    versions = [AppliedVersion(d.version, d.round, closed_at.get(d.round), d)
                for d in snapshot.deltas]
    for expected, found in enumerate(versions, start=1):
        if found.version != expected:
            raise ReplayError(f"{db_path}: version {expected} is missing from the increments "
                              f"(next stored is {found.version}); the record cannot be replayed")
    return versions


def selected_versions(last: int, every: int) -> set[int]:
    """Versions to evaluate: the base, every `every`-th and always the last."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    return {0, last, *range(every, last + 1, every)}


# ---------------------------------------------------------------------------- stepping


def load_replay_model(source: ModelSource) -> LoadedModel:
    """The base model with every block trainable in fp32 (so every delta lands)."""
    num_blocks = int(source.config.num_hidden_layers)
    return load_model(source, range(num_blocks), REPLAY_LOAD)


def _all_blocks(loaded: LoadedModel, readout: LabelReadout | None = None) -> BlockTensors:
    blocks: dict[int, NamedTensors] = {b: loaded.trainable_parameters(b) for b in range(loaded.num_blocks)}
    if readout is not None:
        blocks[readout_block(loaded.num_blocks)] = readout.tensors()
    return blocks


def replay_readout(loaded: LoadedModel, db_path: Path,
                   batches: Sequence[ClassificationBatch]) -> LabelReadout | None:
    """The label readout attached to `loaded` at the base head's rows where the record's
    increments move one (column R, zorba_common.readout), for `apply_delta_` to move; its
    tokens are the batches' label words'."""
    column = readout_block(loaded.num_blocks)
    if not batches or not any(column in v.delta.blocks or column == v.delta.readout_block
                                for v in applied_versions(db_path)):
        return None
    words = batches[0].label_tokens
    readout, _ = attach_readout(loaded.model, sorted(set(words[words != IGNORE_INDEX].tolist())))
    return readout


def apply_delta_(loaded: LoadedModel, seed: int, applied: AppliedVersion,
                 readout: LabelReadout | None = None) -> None:
    """Sync as a client does (client/trainer.py `apply_deltas`): one direction per entry
    (the readout's rows too, where the run has one)."""
    delta = applied.delta
    if delta.version != applied.version:
        raise ReplayError(f"the increment stored as version {applied.version} says it is "
                          f"version {delta.version}")
    increments = [AlphaIncrement(k, b, v) for k, b, v in delta.entries()]
    apply_increments_(_all_blocks(loaded, readout), seed, increments)


@torch.no_grad()
def load_weights_(loaded: LoadedModel, path: Path) -> None:
    """Copy a fedavg weight file into the model; every block parameter must be in it."""
    from safetensors import safe_open

    if not path.exists():
        raise ReplayError(
            f"fedavg weights {path} are missing: the server keeps every version's weights only "
            "when the run is started with keep_weight_versions (FederationPlan."
            "keep_weight_versions=True)")
    params = {(b, name): p for b in range(loaded.num_blocks)
              for name, p in loaded.trainable_parameters(b)}
    seen: set[tuple[int, str]] = set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            try:
                where = parse_key(key)
            except ValueError as exc:
                raise ReplayError(f"{path}: {exc}") from None
            param = params.get(where)
            if param is None:
                raise ReplayError(f"{path}: tensor {key!r} names no parameter of the model")
            tensor = f.get_tensor(key)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ReplayError(f"{path}: tensor {key!r} is {tuple(tensor.shape)}, the model's "
                                  f"parameter is {tuple(param.shape)}")
            param.copy_(tensor)
            seen.add(where)
    missing = sorted(set(params) - seen)
    if missing:
        # A partial file would leave those parameters at the previous version: refuse.
        b, name = missing[0]
        raise ReplayError(f"{path} lacks {len(missing)} block parameter(s), e.g. "
                          f"blocks.{b}.{name}: fedavg weights cover every block")


def replay_versions(loaded: LoadedModel, db_path: Path, mode: str,
                    readout: LabelReadout | None = None) -> Iterator[AppliedVersion]:
    """Bring `loaded` (at the base weights) to each applied version in turn, yielding each.

    The model holds that version's weights while the caller has the yielded value.
    """
    if mode not in RUN_MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(RUN_MODES)}")
    versions = applied_versions(db_path)
    if mode == FEDAVG:
        weights_dir = default_weights_dir(db_path)
        for applied in versions:
            load_weights_(loaded, version_path(weights_dir, applied.version))
            yield applied
        return
    seed = run_seed(db_path)
    for applied in versions:
        apply_delta_(loaded, seed, applied, readout)
        yield applied


# ---------------------------------------------------------------------------- evaluating


Progress = Callable[[str], None]


def _evaluate(loaded: LoadedModel, batches: Sequence[ClassificationBatch], version: int,
              round_: int, closed_at: float | None) -> ReplayPoint:
    started = time.perf_counter()
    result = evaluate_classification(loaded.model, batches)
    return ReplayPoint(version, round_, closed_at, result.accuracy, result.loss,
                       time.perf_counter() - started)


def replay(db_path: Path, mode: str, source: ModelSource,
           batches: Sequence[ClassificationBatch], *, every: int = 1,
           progress: Progress | None = None) -> Replay:
    """Accuracy and loss of the base model and of every `every`-th applied version."""
    started = time.perf_counter()
    loaded = load_replay_model(source)
    load_s = time.perf_counter() - started
    last = len(applied_versions(db_path))
    chosen = selected_versions(last, every)
    points = [_evaluate(loaded, batches, 0, 0, None)]
    apply_s = 0.0
    stepping = time.perf_counter()
    readout = None if mode == FEDAVG else replay_readout(loaded, db_path, batches)
    for applied in replay_versions(loaded, db_path, mode, readout):
        apply_s += time.perf_counter() - stepping
        if applied.version in chosen:
            points.append(_evaluate(loaded, batches, applied.version, applied.round,
                                    applied.closed_at))
            if progress is not None:
                p = points[-1]
                progress(f"replay {mode} v{p.version}/{last} (round {p.round}): accuracy "
                         f"{p.accuracy:.4f}, loss {p.loss:.4f} ({p.eval_s:.1f} s)")
        stepping = time.perf_counter()
    return Replay(points, load_s, apply_s)


def replay_run(plan: FederationPlan, db_path: Path, examples: int, *, every: int = 1,
               progress: Progress | None = None) -> Replay:
    """`replay` on the held-out reviews quickstart.evaluate_accuracy scores (same seed, prompt)."""
    from zorba_lab.heldout import EVAL_BATCH_SIZE, heldout_task

    source, task = heldout_task(plan, examples)
    # Tokenised once: every version is scored on the very same batches.
    batches = list(task.batches(EVAL_BATCH_SIZE, plan.run.seq_len))
    return replay(db_path, plan.run.mode, source, batches, every=every, progress=progress)
