"""What a client needs in memory to train a given set of blocks (docs/design.md §4).

    M_n(A) = W_frozen + sum_{b in A} P_b * (bytes_train + bytes_direction + bytes_snapshot
                                            - bytes_frozen)
             + W_embed_head + M_activations(batch, seq_len) + M_runtime

(W_embed_head at the embeddings' own precision, which may be narrower than the training
dtype, plus one widened chunk of the head when it is.) bytes_direction is the packed
direction a step moves along (one bit a parameter); bytes_snapshot is 0 for a client, which
keeps the round's revert copy on disk (zorba_edge.engine.snapshot), and counts a host copy
only for a profile that declares one.

The model is *linear* in the assignment: a fixed part (every block held frozen, plus
embeddings, activations and runtime) and a per-block increment for activating block b.
That linearity is what lets the scheduler state budgets as MILP constraints, so this
module exposes both the total and its linear decomposition. The scheduler (server) and
the client's own admission check both call it; nothing else estimates memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from zorba_common.codec import wire
from zorba_common.limits import MAX_BLOCKS, MAX_DIMENSION, MAX_MODEL_PARAMS
from zorba_common.run_defaults import BATCH_SIZE, SEQ_LEN

# Storage cost per parameter of each precision a block can be held in. nf4 packs two
# weights per byte plus one fp32 absmax per 64-weight block (bitsandbytes' default).
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "int8": 1.0 + 4.0 / 4096,  # LLM.int8 row-wise scale, amortised (rows of >= 4096 bytes)
    "nf4": 0.5 + 4.0 / 64,
}

DIRECTION_BYTES_PER_PARAM = 1 / 8
"""A step's direction z[k], held packed one bit per perturbed parameter while the step moves
along it (zorba_edge.engine.directions.Direction)."""

HEAD_CAST_CHUNK_BYTES = 8 * 2**20
"""An LM head held narrower than the activations is widened this many bytes of rows at a time
for each forward pass (model/loading.py): the one transient it adds, counted below."""


@dataclass(frozen=True)
class ModelFootprint:
    """Sizes of one causal LM, as the loader reports them (parameter counts only).

    Its sizes travel in a client's registration and reach the server's memory arithmetic, so
    each field carries its wire meaning and bounds (`wire`), as the messages' fields do.
    """

    block_params: tuple[int, ...] = field(metadata=wire(
        "Parameters of each transformer block, in block order.", unit="parameters", min_len=1,
        max_len=MAX_BLOCKS, item=wire(ge=1, le=MAX_MODEL_PARAMS)))
    quantizable_block_params: tuple[int, ...] = field(metadata=wire(
        "Of each block's parameters, those in Linear layers (at most the block's; the rest, "
        "norms and biases, stay in `frozen_other_dtype`).", unit="parameters",
        min_len=1, max_len=MAX_BLOCKS, item=wire(ge=0, le=MAX_MODEL_PARAMS)))
    embed_head_params: int = field(metadata=wire(
        "Embeddings, final norm and LM head (tied weights counted once).",
        unit="parameters", ge=1, le=MAX_MODEL_PARAMS))
    hidden_size: int = field(metadata=wire("Width of the residual stream.", ge=1, le=MAX_DIMENSION))
    vocab_size: int = field(metadata=wire("Tokens in the vocabulary.", ge=1, le=MAX_DIMENSION))
    num_layers: int = field(metadata=wire("Transformer blocks; equals the length of `block_params`.",
                                          ge=1, le=MAX_BLOCKS))
    intermediate_size: int = field(metadata=wire("Width of the MLP.", ge=1, le=MAX_DIMENSION))

    def __post_init__(self) -> None:
        if len(self.block_params) != len(self.quantizable_block_params):
            raise ValueError("block_params and quantizable_block_params must have one entry per block")
        if len(self.block_params) != self.num_layers:
            raise ValueError(f"{len(self.block_params)} blocks given for a {self.num_layers}-layer model")

    @property
    def num_blocks(self) -> int:
        return len(self.block_params)


@dataclass(frozen=True)
class MemorySettings:
    """How a client holds the model and what it computes with."""

    train_dtype: str = "fp32"
    frozen_dtype: str = "nf4"
    frozen_other_dtype: str = "fp32"
    """Precision of a frozen block's non-Linear parameters (norms, biases)."""
    embed_dtype: str = "fp32"
    """Embeddings and LM head (the frozen weights outside the blocks); a head narrower than
    train_dtype is computed in train_dtype, widened a chunk of rows at a time."""
    snapshot_dtype: str | None = None
    """Host copy of each trainable block for the exact round-end revert (None: no copy in
    memory; a client spills it to disk, zorba_edge.engine.snapshot)."""
    batch_size: int = BATCH_SIZE
    seq_len: int = SEQ_LEN
    runtime_bytes: int = 350 * 2**20
    """Interpreter, torch, transformers and allocator overhead, measured on CPU (calibrated)."""
    calibration: float = 1.0
    """Multiplier learned from the client's measured peaks (server-side calibration)."""

    def __post_init__(self) -> None:
        for name in ("train_dtype", "frozen_dtype", "frozen_other_dtype", "embed_dtype"):
            value = getattr(self, name)
            if value not in BYTES_PER_PARAM:
                raise ValueError(f"{name}={value!r}: expected one of {sorted(BYTES_PER_PARAM)}")
        if self.snapshot_dtype is not None and self.snapshot_dtype not in BYTES_PER_PARAM:
            raise ValueError(
                f"snapshot_dtype={self.snapshot_dtype!r}: expected one of {sorted(BYTES_PER_PARAM)}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        if self.calibration <= 0:
            raise ValueError("calibration must be positive")


MEMORY_HEADROOM = 0.05
"""Share of a declared budget that admission and scheduling leave free: the memory model is an
estimate (allocator fragmentation and slow RSS growth are not in it). One number for the
client's own check, the server's registration and the scheduler (`run.memory_headroom`
defaults to it): when the client and the registration judged the whole budget and the
scheduler 95% of it, a client could be admitted and then never scheduled (issue 27)."""


def usable_budget(budget_bytes: int, headroom: float = MEMORY_HEADROOM) -> int:
    """The part of a declared budget the memory model may fill."""
    return int(budget_bytes * (1 - headroom))


@dataclass(frozen=True)
class LinearMemoryModel:
    """M(A) = fixed_bytes + sum_{b in A} block_bytes[b]: the form the scheduler's MILP uses."""

    fixed_bytes: int
    block_bytes: tuple[int, ...] = field(default_factory=tuple)

    def total(self, assignment: Iterable[int]) -> int:
        return self.fixed_bytes + sum(self.block_bytes[b] for b in set(assignment))

    def blocks_within(self, budget_bytes: int) -> int:
        """How many blocks (the cheapest first) fit a budget; -1 if not even the frozen model
        fits. The admission rule (`admits`) asks it of the usable budget."""
        room = budget_bytes - self.fixed_bytes
        if room < 0:
            return -1
        count = 0
        for cost in sorted(self.block_bytes):
            if cost > room:
                break
            room -= cost
            count += 1
        return count


    def admits(self, budget_bytes: int, headroom: float = MEMORY_HEADROOM) -> bool:
        """The admission rule: the device can train at least one block within the usable part
        of its declared budget. The client's own check, the server's registration and the
        scheduler (through `usable_budget`) all ask this, so a device admitted is a device
        that can be scheduled."""
        return self.blocks_within(usable_budget(budget_bytes, headroom)) >= 1

    def budget_needed(self, headroom: float = MEMORY_HEADROOM) -> int:
        """The smallest declared budget that admits this device (the frozen model plus its
        cheapest block within the usable part): what to pass as --memory-budget."""
        need = self.fixed_bytes + min(self.block_bytes, default=0)
        return math.ceil(need / (1 - headroom))


def frozen_block_bytes(footprint: ModelFootprint, settings: MemorySettings, block: int) -> float:
    quantizable = footprint.quantizable_block_params[block]
    other = footprint.block_params[block] - quantizable
    return (
        quantizable * BYTES_PER_PARAM[settings.frozen_dtype]
        + other * BYTES_PER_PARAM[settings.frozen_other_dtype]
    )


def trainable_block_bytes(footprint: ModelFootprint, settings: MemorySettings, block: int) -> float:
    params = footprint.block_params[block]
    snapshot = BYTES_PER_PARAM[settings.snapshot_dtype] if settings.snapshot_dtype else 0.0
    return params * (BYTES_PER_PARAM[settings.train_dtype] + DIRECTION_BYTES_PER_PARAM + snapshot)


def activation_bytes(footprint: ModelFootprint, settings: MemorySettings) -> float:
    """Peak activations of a no-grad forward pass.

    Without autograd only one block's intermediates live at a time; the logits
    (tokens x vocab, fp32, plus the log-softmax the loss takes of them) dominate
    for small models with large vocabularies.
    """
    tokens = settings.batch_size * settings.seq_len
    hidden_states = tokens * footprint.hidden_size * 4 * 6
    mlp = tokens * footprint.intermediate_size * 4 * 3
    logits = tokens * footprint.vocab_size * 4 * 2
    return hidden_states + mlp + logits


def embed_head_bytes(footprint: ModelFootprint, settings: MemorySettings) -> float:
    """Embeddings, final norm and head as held, plus the widened chunk of a narrow head.

    The final norm's few hundred parameters stay in train_dtype (a LayerNorm cannot take a
    narrower weight than its input) but are counted at embed_dtype: under a KiB off.
    """
    held = footprint.embed_head_params * BYTES_PER_PARAM[settings.embed_dtype]
    if settings.embed_dtype == settings.train_dtype:
        return held
    head_bytes = footprint.vocab_size * footprint.hidden_size * BYTES_PER_PARAM[settings.train_dtype]
    return held + min(HEAD_CAST_CHUNK_BYTES, head_bytes)


def held_weights_bytes(footprint: ModelFootprint, settings: MemorySettings) -> float:
    """The model as a client holds it between rounds: every block frozen, embeddings and head."""
    frozen = sum(frozen_block_bytes(footprint, settings, b) for b in range(footprint.num_blocks))
    return frozen + embed_head_bytes(footprint, settings)


def measured_runtime_bytes(footprint: ModelFootprint, settings: MemorySettings,
                           held_bytes: int) -> int:
    """The runtime term from a measurement: what a process holding the model (every block
    frozen, between forward passes) holds beyond the weights this model counts for it.

    Measured so, the runtime takes in all a process gains by loading and running a model that
    no term names (allocator arenas, thread pools, kernels' scratch, libraries paged in), which
    a reading before the load missed (docs/design.md §4)."""
    return max(0, held_bytes - math.ceil(held_weights_bytes(footprint, settings)))


def linear_memory_model(footprint: ModelFootprint, settings: MemorySettings) -> LinearMemoryModel:
    """Decompose M(A) into its fixed part and its per-activated-block increments."""
    frozen = [frozen_block_bytes(footprint, settings, b) for b in range(footprint.num_blocks)]
    trainable = [trainable_block_bytes(footprint, settings, b) for b in range(footprint.num_blocks)]
    fixed = (
        held_weights_bytes(footprint, settings)
        + activation_bytes(footprint, settings)
        + settings.runtime_bytes
    )
    scale = settings.calibration
    return LinearMemoryModel(
        fixed_bytes=int(round(fixed * scale)),
        block_bytes=tuple(int(round((t - f) * scale)) for t, f in zip(trainable, frozen, strict=True)),
    )


def client_memory_bytes(
    footprint: ModelFootprint, settings: MemorySettings, assignment: Iterable[int]
) -> int:
    """M_n(A): the bytes a client needs to train `assignment` with everything else frozen."""
    blocks = set(assignment)
    unknown = sorted(b for b in blocks if not 0 <= b < footprint.num_blocks)
    if unknown:
        raise ValueError(f"blocks {unknown} do not exist: the model has {footprint.num_blocks} blocks")
    return linear_memory_model(footprint, settings).total(blocks)


def max_blocks_within(
    footprint: ModelFootprint, settings: MemorySettings, budget_bytes: int
) -> int:
    """How many blocks (the cheapest first) fit a budget; -1 if not even the frozen model fits."""
    return linear_memory_model(footprint, settings).blocks_within(budget_bytes)
