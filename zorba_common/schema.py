"""The wire messages of protocol v1 (docs/design.md §6), shared by the client daemon and the server.

Every body is one msgpack map whose keys are the fields of a dataclass below. Decoding is
strict, because whatever a peer sends reaches the coefficient table: unknown or missing
keys, a wrong type (a bool where an int goes, a str where bytes go), a NaN or infinite
float, a string or list over its length limit, or a body over its byte limit is a
`SchemaError` that names the field and what to send instead. Both sides validate: the
server what it receives, the client what it receives back.

`docs/protocol.md` describes the endpoints that carry these messages.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import msgpack
import numpy as np

from zorba_common.errors import ZorbaError
from zorba_common.memory_model import BYTES_PER_PARAM, MemorySettings, ModelFootprint

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/msgpack"

# Byte limits per body. A report carries two numbers per local step, so its limit follows
# from MAX_STEPS_PER_REPORT (about 13 bytes a step in msgpack) with room to spare.
MAX_REGISTER_BYTES = 64 * 1024
MAX_STEPS_PER_REPORT = 65_536
MAX_REPORT_BYTES = 2 * 1024 * 1024
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""What a client accepts back: /v1/state is K x B float64, 8 MiB at K=4096, B=256."""

MAX_STR_LEN = 256
"""Default limit for a string field (ids, names, dtype labels)."""
MAX_SEQUENCE_LEN = 65_536
"""Default limit for a list field (blocks, pool indices, steps)."""

# Run modes (issue 5): the system and the baselines it is measured against, as one server and
# client. `zorba`: the scheduler's heterogeneous block activation; `zorba-uniform`: the same
# number of random blocks on every client; `fedzo-full`: zeroth-order on every block, clients
# that cannot hold them all excluded; `fedavg`: first-order AdamW on every block, weights
# exchanged both ways (budgets are reported against, not enforced).
ZORBA, ZORBA_UNIFORM, FEDZO_FULL, FEDAVG = "zorba", "zorba-uniform", "fedzo-full", "fedavg"
RUN_MODES = (ZORBA, ZORBA_UNIFORM, FEDZO_FULL, FEDAVG)
MAX_WEIGHTS_BYTES = 8 * 1024**3
"""Largest fedavg weight upload or download (an 8 GiB fp32 checkpoint: ~2B parameters)."""

T = TypeVar("T")
DTYPES = tuple(BYTES_PER_PARAM)
"""Precisions a block can be held in."""

# Plausibility bounds: a value outside them is not a measurement but a bug or an attack, and
# letting it through poisons arithmetic downstream (a loss of 1e308 overflows the round's
# mean to inf; a peak of 2**63-1 pins a client's calibration at its clamp for good).
MAX_COUNTER = 2**53 - 1
"""Largest round number or alpha version: the largest integer every JSON reader holds exactly."""
MAX_MEMORY_BYTES = 2**50
"""1 PiB: no device budget, peak or runtime overhead is larger."""
MAX_LOSS = 1e6
"""Mean cross-entropy in nats; ln(vocabulary) is about 12 for a random model."""
MAX_STEP_TIME_S = 86_400.0
"""One local step (two forward passes) taking over a day is not a working device."""
MAX_SAMPLES = 2**40
MAX_BLOCKS = 4096
"""Transformer blocks of a model (the largest models today have about 130)."""
MAX_MODEL_PARAMS = 10**13
"""Parameters of a whole model, and so of any one block (10 trillion)."""
MAX_DIMENSION = 2**24
"""Hidden, intermediate and vocabulary sizes."""

# The limit keys the decoder applies; every other metadata key (doc, unit) is for people.
_LIMIT_KEYS = ("min_len", "max_len", "ge", "le", "gt", "item", "gradient", "choices")


class SchemaError(ZorbaError, ValueError):
    """A body that is not a valid message of this protocol; `code` is the wire error code."""

    def __init__(self, message: str, *, code: str = "invalid_message") -> None:
        super().__init__(message)
        self.code = code


def wire(doc: str = "", *, unit: str = "", min_len: int | None = None,
         max_len: int | None = None, ge: float | None = None, le: float | None = None,
         gt: float | None = None, item: dict[str, Any] | None = None,
         gradient: bool = False, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Field metadata: what the field means (doc, unit) and what the decoder enforces.

    `min_len`/`max_len` bound a string, bytes or list; `ge`/`gt`/`le` bound a number; `item` holds
    the bounds of each item of a list (`wire(ge=1)`); `choices` lists a string's allowed
    values; `gradient` marks the projected
    gradients, whose non-finite values are `invalid_scalar` (422) rather than
    `invalid_message` (400). docs/protocol.md and docs/protocol.schema.json are generated
    from this metadata (`python -m zorba_common.protocol_docs`).
    """
    limits = {"min_len": min_len, "max_len": max_len, "ge": ge, "le": le, "gt": gt,
              "gradient": gradient or None, "choices": choices,
              "item": None if item is None else _limit_items(item)}
    return {"doc": doc, "unit": unit, **{k: v for k, v in limits.items() if v is not None}}


def _limit_items(meta: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The decoder-relevant part of field metadata, hashable (decoders are cached on it)."""
    return tuple(sorted((k, v) for k, v in meta.items() if k in _LIMIT_KEYS and v is not None))


# Wire meaning of the fields of ModelFootprint, which lives with the memory model (the loader
# fills it in): its sizes reach the server's memory arithmetic, so they are bounded here.
FOOTPRINT_FIELDS: dict[str, dict[str, Any]] = {
    "block_params": wire("Parameters of each transformer block, in block order.",
                         unit="parameters", min_len=1, max_len=MAX_BLOCKS,
                         item=wire(ge=1, le=MAX_MODEL_PARAMS)),
    "quantizable_block_params": wire(
        "Of each block's parameters, those in Linear layers (at most the block's; the rest, "
        "norms and biases, stay in `frozen_other_dtype`).", unit="parameters",
        min_len=1, max_len=MAX_BLOCKS, item=wire(ge=0, le=MAX_MODEL_PARAMS)),
    "embed_head_params": wire("Embeddings, final norm and LM head (tied weights counted once).",
                              unit="parameters", ge=1, le=MAX_MODEL_PARAMS),
    "hidden_size": wire("Width of the residual stream.", ge=1, le=MAX_DIMENSION),
    "vocab_size": wire("Tokens in the vocabulary.", ge=1, le=MAX_DIMENSION),
    "num_layers": wire("Transformer blocks; equals the length of `block_params`.",
                       ge=1, le=MAX_BLOCKS),
    "intermediate_size": wire("Width of the MLP.", ge=1, le=MAX_DIMENSION),
}


def check_footprint(footprint: ModelFootprint) -> None:
    """The cross-field rules of a footprint (each field's own bounds are in FOOTPRINT_FIELDS)."""
    over = [(b, q, p) for b, (q, p) in enumerate(
        zip(footprint.quantizable_block_params, footprint.block_params, strict=True)) if q > p]
    if over:
        b, q, p = over[0]
        raise SchemaError(f"footprint.quantizable_block_params[{b}]: {q} exceeds the block's "
                          f"{p} parameters; send the loader's footprint unchanged")
    total = sum(footprint.block_params) + footprint.embed_head_params
    if total > MAX_MODEL_PARAMS:
        raise SchemaError(f"footprint: {total} parameters in all exceed the limit of "
                          f"{MAX_MODEL_PARAMS}")


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ErrorBody:
    """Body of every 4xx/5xx answer."""

    error: str = field(metadata=wire(
        "Stable machine-readable code, e.g. `round_closed`, `invalid_scalar` (see Errors)."))
    message: str = field(metadata=wire("What was wrong and what to do, for people.",
                                       max_len=4096))


@dataclass(frozen=True)
class MemoryProfile:
    """How the device holds the model: the device-side half of `MemorySettings`.

    The run fixes batch size and sequence length and the server learns the calibration
    from measured peaks, so those are not the client's to send.
    """

    train_dtype: str = field(default="fp32", metadata=wire(
        "Precision of an activated (trainable) block.", choices=DTYPES))
    frozen_dtype: str = field(default="nf4", metadata=wire(
        "Precision of a frozen block's Linear weights.", choices=DTYPES))
    frozen_other_dtype: str = field(default="fp32", metadata=wire(
        "Precision of a frozen block's other parameters (norms, biases).", choices=DTYPES))
    embed_dtype: str = field(default="fp32", metadata=wire(
        "Precision of the embeddings and LM head.", choices=DTYPES))
    snapshot_dtype: str | None = field(default="fp32", metadata=wire(
        "Host copy of each trainable block for the exact round-end revert (nil: no copy).",
        choices=DTYPES))
    runtime_bytes: int = field(default=350 * 2**20, metadata=wire(
        "Interpreter, framework and allocator overhead.", unit="bytes", ge=0,
        le=MAX_MEMORY_BYTES))

    def __post_init__(self) -> None:
        self.settings(batch_size=1, seq_len=1)  # MemorySettings checks the dtype names

    def settings(self, batch_size: int, seq_len: int, calibration: float = 1.0) -> MemorySettings:
        return MemorySettings(
            train_dtype=self.train_dtype,
            frozen_dtype=self.frozen_dtype,
            frozen_other_dtype=self.frozen_other_dtype,
            embed_dtype=self.embed_dtype,
            snapshot_dtype=self.snapshot_dtype,
            batch_size=batch_size,
            seq_len=seq_len,
            runtime_bytes=self.runtime_bytes,
            calibration=calibration,
        )


@dataclass(frozen=True)
class DeviceProfile:
    """What a device tells the server when it registers."""

    device_type: str = field(metadata=wire("`cpu`, `cuda`, `mps`, ...: for people and metrics."))
    memory_budget_bytes: int = field(metadata=wire(
        "Free memory measured at start-up, less the client's safety margin.", unit="bytes",
        gt=0, le=MAX_MEMORY_BYTES))
    step_time_s: float = field(metadata=wire(
        "Measured time of one local step (two forward passes) on this device.", unit="seconds",
        gt=0, le=MAX_STEP_TIME_S))
    num_samples: int = field(metadata=wire(
        "Local training examples: the client's aggregation and coverage weight w_n.",
        unit="examples", gt=0, le=MAX_SAMPLES))
    footprint: ModelFootprint = field(metadata=wire(
        "Sizes of the model, as the loader reports them."))
    model_fingerprint: str = field(metadata=wire(
        "Identifies the base model (weights and tokenizer); every client of a run must match.",
        min_len=1))
    memory: MemoryProfile = field(default=MemoryProfile(), metadata=wire(
        "The device's precisions and runtime overhead."))
    name: str = field(default="", metadata=wire("Optional label for the status page."))

    def __post_init__(self) -> None:
        check_footprint(self.footprint)


@dataclass(frozen=True)
class RegisterRequest:
    """POST /v1/clients."""

    enrolment_secret: str = field(metadata=wire("The run's enrolment secret."))
    profile: DeviceProfile = field(metadata=wire("The device and its model."))
    protocol: int = field(default=PROTOCOL_VERSION, metadata=wire(
        f"Protocol version the client speaks ({PROTOCOL_VERSION})."))


ANTITHETIC, ONE_SIDED, NORMALISED = "antithetic", "one-sided", "normalised"
ESTIMATORS = (ANTITHETIC, ONE_SIDED, NORMALISED)


@dataclass(frozen=True)
class HyperParams:
    """The run's hyper-parameters of local training."""

    lr: float = field(metadata=wire("Learning rate of the ZO steps.", gt=0))
    mu: float = field(metadata=wire("Perturbation scale.", gt=0))
    batch_size: int = field(metadata=wire("Examples per local step.", unit="examples", ge=1))
    seq_len: int = field(metadata=wire("Tokens per example.", unit="tokens", ge=1))
    estimator: str = field(default=ANTITHETIC, metadata=wire(
        "How a batch's projected gradients are measured: `antithetic` (two forwards per "
        "direction), `one-sided` (n directions share one unperturbed forward: n + 1) or "
        "`normalised` (one-sided, each loss difference divided by the standard deviation of "
        "the batch's n differences instead of by mu: a step of one size whatever the model's "
        "gradient scale; n >= 2).",
        choices=ESTIMATORS))
    directions: int = field(default=1, metadata=wire(
        "Directions (pool indices) measured on each batch; each reports its own (k, g) and "
        "moves theta by lr * g * z.", ge=1, le=64))
    trust_radius: float = field(default=0.0, metadata=wire(
        "The trust region: the longest RMS move per perturbed parameter one batch's step may "
        "make, as a fraction of the RMS of the client's perturbed weight matrices; a longer "
        "step is scaled down to it, its reported scalars with it (0: no limit; a client of an "
        "older server, which sends no field, takes no limit).", ge=0))


@dataclass(frozen=True)
class RunInfo:
    """The run a client joined: what it needs to build the same directions and model."""

    run_id: str = field(metadata=wire("Identifies the run (and its database)."))
    seed: int = field(metadata=wire(
        "Run seed of the noise z[k, b] (zorba_common.noise).", ge=0))
    pool_size: int = field(metadata=wire("K, seeds in the pool.", ge=1))
    num_blocks: int = field(metadata=wire("B, blocks of the model.", ge=1, le=MAX_BLOCKS))
    model_fingerprint: str = field(metadata=wire("The run's base model."))
    hyper: HyperParams = field(metadata=wire("Hyper-parameters of local training."))
    round_duration_s: float = field(metadata=wire(
        "From a round's opening to its deadline.", unit="seconds", gt=0))
    poll_timeout_s: float = field(metadata=wire(
        "Longest wait of a long poll.", unit="seconds", gt=0))
    max_abs_scalar: float = field(metadata=wire(
        "Reports with a projected gradient beyond this magnitude are refused.", gt=0))
    mode: str = field(default=ZORBA, metadata=wire(
        "The run mode (see Run modes); a client of an older server (no field) runs `zorba`.",
        choices=RUN_MODES))


@dataclass(frozen=True)
class RegisterResponse:
    """201 answer to POST /v1/clients."""

    client_id: str = field(metadata=wire("The client's id, kept in its state file."))
    token: str = field(metadata=wire(
        "Bearer token for every later request; the server keeps only its hash."))
    run: RunInfo = field(metadata=wire("The run joined."))


@dataclass(frozen=True)
class AlphaDelta:
    """One applied round: alpha[k, b] += values[i, j] for k = pool_indices[i], b = blocks[j].

    A client syncs by `theta[b] -= value * z[k, b]` for every entry whose block it holds.
    """

    version: int = field(metadata=wire(
        "The alpha version this delta produces (versions count published deltas: applied "
        "rounds and the loss guard's rollbacks).",
        ge=1, le=MAX_COUNTER))
    round: int = field(metadata=wire("The round applied.", ge=1, le=MAX_COUNTER))
    pool_indices: tuple[int, ...] = field(metadata=wire("Rows of alpha: distinct, ascending.",
                                                        item=wire(ge=0)))
    blocks: tuple[int, ...] = field(metadata=wire("Columns of alpha: distinct, ascending.",
                                                  item=wire(ge=0)))
    values: bytes = field(metadata=wire(
        "float32 little-endian, len(pool_indices) x len(blocks), row-major.",
        max_len=MAX_SEQUENCE_LEN * 256 * 4))

    def __post_init__(self) -> None:
        expected = 4 * len(self.pool_indices) * len(self.blocks)
        if len(self.values) != expected:
            raise SchemaError(
                f"values: {len(self.values)} bytes for {len(self.pool_indices)} pool indices x "
                f"{len(self.blocks)} blocks; expected {expected} (float32)"
            )

    def matrix(self) -> np.ndarray:
        return np.frombuffer(self.values, dtype="<f4").reshape(
            len(self.pool_indices), len(self.blocks)
        )

    def entries(self) -> list[tuple[int, int, float]]:
        """The non-zero (k, block, delta) triples, k-major."""
        matrix = self.matrix()
        return [
            (self.pool_indices[i], self.blocks[j], float(matrix[i, j]))
            for i, j in zip(*np.nonzero(matrix), strict=True)
        ]

    @staticmethod
    def from_matrix(version: int, round_: int, pool_indices: tuple[int, ...],
                    blocks: tuple[int, ...], matrix: np.ndarray) -> AlphaDelta:
        values = np.ascontiguousarray(matrix, dtype="<f4").tobytes()
        return AlphaDelta(version, round_, tuple(pool_indices), tuple(blocks), values)


@dataclass(frozen=True)
class Assignment:
    """What one client trains in one round."""

    round: int = field(metadata=wire("The round.", ge=1, le=MAX_COUNTER))
    base_version: int = field(metadata=wire(
        "The alpha version the round trains on; the client must be synced to it.",
        ge=0, le=MAX_COUNTER))
    blocks: tuple[int, ...] = field(metadata=wire(
        "The activated blocks; every other block stays frozen.", item=wire(ge=0)))
    pool_indices: tuple[int, ...] = field(metadata=wire(
        "One pool index per local step, in order (k_t for step t).", item=wire(ge=0)))
    hyper: HyperParams = field(metadata=wire("Hyper-parameters of this round."))
    deadline_in_s: float = field(metadata=wire(
        "Time from the answer to the round's deadline (use this, not the wall clock).",
        unit="seconds"))
    deadline_unix: float = field(metadata=wire("The deadline on the server's clock.",
                                               unit="seconds since 1970 (UTC)"))


WAIT, TRAIN, FINISHED = "wait", "train", "finished"


@dataclass(frozen=True)
class NextRound:
    """200 answer to GET /v1/rounds/next."""

    status: str = field(metadata=wire(
        "`train` (assignment set), `wait` (poll again), `finished` (the run is over).",
        choices=(TRAIN, WAIT, FINISHED)))
    version: int = field(metadata=wire("The server's alpha version now.", ge=0, le=MAX_COUNTER))
    assignment: Assignment | None = field(default=None, metadata=wire(
        "The work, with status `train` and only then."))
    deltas: tuple[AlphaDelta, ...] = field(default=(), metadata=wire(
        "From the client's version to the assignment's base version (or to `version`)."))
    catch_up: bool = field(default=False, metadata=wire(
        "The gap is too large for deltas: fetch GET /v1/state, then poll again."))
    retry_after_s: float = field(default=0.0, metadata=wire(
        "Suggested pause before the next poll.", unit="seconds", ge=0))
    reason: str = field(default="", metadata=wire("Why there is no work, for people.",
                                                  max_len=4096))

    def __post_init__(self) -> None:
        if self.status not in (WAIT, TRAIN, FINISHED):
            raise SchemaError(f"status: {self.status!r} is not one of train, wait, finished")
        if (self.status == TRAIN) != (self.assignment is not None):
            raise SchemaError("status: an assignment comes with status 'train' and only then")


@dataclass(frozen=True)
class Report:
    """POST /v1/rounds/{round}/reports: what a client measured in one round."""

    idempotency_key: str = field(metadata=wire(
        "Client-chosen, unique per report: a retry with the same key and content is safe.",
        max_len=128))
    base_version: int = field(metadata=wire("The alpha version the client trained on.",
                                            ge=0, le=MAX_COUNTER))
    steps: tuple[tuple[int, float], ...] = field(metadata=wire(
        "(k_t, g_t) per local step, in step order: a prefix of the assignment's pool indices "
        "(at least one; none in the fedavg baseline, whose training travels as weights). "
        "Each g_t finite with |g_t| <= the run's max_abs_scalar.",
        max_len=MAX_STEPS_PER_REPORT, gradient=True))
    num_samples: int = field(metadata=wire(
        "Examples seen this round (the aggregation weight is the registered sample count).",
        unit="examples", ge=0, le=MAX_SAMPLES))
    loss_mean: float = field(metadata=wire("Mean training loss of the round.", unit="nats",
                                           ge=0, le=MAX_LOSS))
    loss_last: float = field(metadata=wire("Training loss of the last step.", unit="nats",
                                           ge=0, le=MAX_LOSS))
    peak_memory_bytes: int = field(metadata=wire(
        "Measured peak of the round (0: not measured).", unit="bytes", ge=0,
        le=MAX_MEMORY_BYTES))
    step_time_s: float = field(metadata=wire("Measured time of one local step.", unit="seconds",
                                             ge=0, le=MAX_STEP_TIME_S))
    loss_check: float | None = field(default=None, metadata=wire(
        "Loss of the model as received (base_version, before any local step) on the client's "
        "check batch, the same examples every round: how the server tells whether an applied "
        "update made the model worse (docs/learning.md, the loss guard). Absent: not measured.",
        unit="nats", ge=0, le=MAX_LOSS))

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            raise SchemaError("idempotency_key: must not be empty (use a fresh random string)")


@dataclass(frozen=True)
class ReportAck:
    """200 answer to a report; a retry with the same key gets the very same ack."""

    round: int = field(metadata=wire("The round reported to."))
    idempotency_key: str = field(metadata=wire("The report's key.", max_len=128))
    received_at: float = field(metadata=wire("When the server committed the report.",
                                             unit="seconds since 1970 (UTC)"))


@dataclass(frozen=True)
class AlphaState:
    """200 answer to GET /v1/state: the whole coefficient table."""

    run_id: str = field(metadata=wire("The run."))
    version: int = field(metadata=wire("The table's alpha version.", ge=0, le=MAX_COUNTER))
    pool_size: int = field(metadata=wire("K, rows.", ge=1))
    num_blocks: int = field(metadata=wire("B, columns.", ge=1))
    alpha: bytes = field(metadata=wire(
        "float64 little-endian, pool_size x num_blocks, row-major (alpha[k, b] at k*B + b).",
        max_len=MAX_RESPONSE_BYTES))

    def __post_init__(self) -> None:
        expected = 8 * self.pool_size * self.num_blocks
        if len(self.alpha) != expected:
            raise SchemaError(
                f"alpha: {len(self.alpha)} bytes, expected {expected} (float64 K x B)")

    def matrix(self) -> np.ndarray:
        return np.frombuffer(self.alpha, dtype="<f8").reshape(self.pool_size, self.num_blocks)


MESSAGES: tuple[type, ...] = (RegisterRequest, RegisterResponse, NextRound, Report, ReportAck,
                              AlphaState, ErrorBody)
"""The top-level bodies, in the order docs/protocol.md lists them."""


# ---------------------------------------------------------------------------- encoding


def encode(message: Any) -> bytes:
    """The msgpack body of a message dataclass."""
    # msgpack packs tuples as arrays itself and calls `default` only for what it does not
    # know (our dataclasses): no Python-level walk over long lists of numbers.
    return msgpack.packb(message, default=_as_map, use_bin_type=True)


def _as_map(value: Any) -> dict[str, Any]:
    # mypy checks a class object against Hashable through the instances' __hash__ (an
    # unbound method there), so it calls every class unhashable; a class is hashable.
    names = _field_names(type(value))  # type: ignore[arg-type]
    if names is None:
        raise TypeError(f"cannot encode {type(value).__name__} as a protocol message")
    return {name: getattr(value, name) for name in names}


@cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    if not dataclasses.is_dataclass(cls):
        return None
    return tuple(f.name for f in dataclasses.fields(cls))


def decode(cls: type[T], data: bytes, *, max_bytes: int) -> T:
    """Parse and validate a body as message `cls`; anything invalid raises SchemaError."""
    if len(data) > max_bytes:
        raise SchemaError(
            f"body of {len(data)} bytes exceeds the {max_bytes}-byte limit of {cls.__name__}",
            code="too_large",
        )
    try:
        # unpackb bounds every string, list and map by len(data), so a small body cannot
        # announce a huge container.
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True,
                              object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise SchemaError(f"{cls.__name__}: {exc}; send each field once") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SchemaError(
            f"body is not valid msgpack ({type(exc).__name__}: {exc}); send one msgpack map "
            f"encoded as {cls.__name__}"
        ) from None
    return from_wire(cls, obj)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A msgpack map as a dict. A repeated key is refused: a plain dict would keep the last
    value silently, so two readers of the same bytes could disagree on what was sent."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[Any] = set()
        repeated = None
        for key, _ in pairs:
            if key in seen:
                repeated = key
                break
            seen.add(key)
        raise _DuplicateKey(f"key {repeated!r} appears more than once in one map")
    return out


def from_wire(cls: type[T], obj: Any) -> T:
    """Validate an already-unpacked msgpack object as message `cls`."""
    return _decoder(cls)(obj, cls.__name__)  # type: ignore[arg-type]  # as in _as_map


def field_meta(cls: type, f: dataclasses.Field[Any]) -> Mapping[str, Any]:
    """A field's wire metadata (see `wire`), wherever it is declared."""
    if cls is ModelFootprint:
        return FOOTPRINT_FIELDS[f.name]
    return f.metadata


_Decoder = Callable[[Any, str], Any]


@cache
def _decoder(tp: Any, meta: tuple[tuple[str, Any], ...] = ()) -> _Decoder:
    """A decoder for type `tp`, built once per (type, field limits) and cached."""
    lim = dict(meta)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"unsupported union {tp}")
        dec = _decoder(inner[0], meta)
        return lambda v, path: None if v is None else dec(v, path)
    if origin is tuple:
        return _tuple_decoder(typing.get_args(tp), lim)
    if tp is bool:
        return _exact(bool, "true or false")
    if tp is int:
        return _number_decoder(int, lim)
    if tp is float:
        return _number_decoder(float, lim)
    if tp is str and "choices" in lim:
        return _choice(lim["choices"])
    if tp is str:
        return _sized(str, "a string", lim.get("min_len", 0), lim.get("max_len") or MAX_STR_LEN)
    if tp is bytes:
        return _sized(bytes, "binary (msgpack bin)", lim.get("min_len", 0),
                      lim.get("max_len") or MAX_SEQUENCE_LEN)
    raise TypeError(f"no wire decoder for {tp!r}")


def _exact(kind: type, wanted: str) -> _Decoder:
    def dec(v: Any, path: str) -> Any:
        if type(v) is not kind:
            raise SchemaError(f"{path}: expected {wanted}, got {_kind(v)}")
        return v

    return dec


def _choice(choices: tuple[str, ...]) -> _Decoder:
    def dec(v: Any, path: str) -> Any:
        if type(v) is not str or v not in choices:
            raise SchemaError(f"{path}: expected one of {', '.join(choices)}, got {_kind(v)}")
        return v

    return dec


def _sized(kind: type[Sized], wanted: str, min_len: int, max_len: int) -> _Decoder:
    def dec(v: Any, path: str) -> Any:
        if type(v) is not kind:
            raise SchemaError(f"{path}: expected {wanted}, got {_kind(v)}")
        if len(v) > max_len:
            raise SchemaError(f"{path}: length {len(v)} exceeds the limit of {max_len}",
                              code="too_large")
        if len(v) < min_len:
            raise SchemaError(f"{path}: must not be empty" if min_len == 1 else
                              f"{path}: length {len(v)} is below the minimum {min_len}")
        return v

    return dec


def _number_decoder(kind: type, lim: dict[str, Any]) -> _Decoder:
    ge, le, gt = lim.get("ge"), lim.get("le"), lim.get("gt")
    gradient = bool(lim.get("gradient"))

    def dec(v: Any, path: str) -> Any:
        t = type(v)
        if kind is int:
            if t is not int:
                raise SchemaError(f"{path}: expected an integer, got {_kind(v)}")
        else:
            if t is int:
                v = float(v)
            elif t is not float:
                raise SchemaError(f"{path}: expected a number, got {_kind(v)}")
            if not math.isfinite(v) and gradient:
                raise SchemaError(
                    f"{path}: {v} is not a finite number; the sender must not produce NaN or "
                    "infinity (for a projected gradient: lower lr or check mu and the loss)",
                    code="invalid_scalar",
                )
            if not math.isfinite(v):
                raise SchemaError(f"{path}: {v} is not a finite number; send a finite value")
        if ge is not None and v < ge:
            raise SchemaError(f"{path}: {v} is below the minimum {ge}")
        if gt is not None and v <= gt:
            raise SchemaError(f"{path}: {v} must be greater than {gt}")
        if le is not None and v > le:
            raise SchemaError(f"{path}: {v} is above the maximum {le}")
        return v

    return dec


def _tuple_decoder(args: tuple[Any, ...], lim: dict[str, Any]) -> _Decoder:
    inherited = (("gradient", True),) if lim.get("gradient") else ()
    if len(args) == 2 and args[1] is Ellipsis:
        # Length limits of the field apply to the sequence, `item` limits to each item.
        item_meta = tuple(sorted(dict(lim.get("item", ())).items())) + inherited
        min_len, max_len = lim.get("min_len", 0), lim.get("max_len") or MAX_SEQUENCE_LEN
        generic = _sequence_decoder(_decoder(args[0], item_meta), min_len, max_len)
        fast = _fast_items(args[0], dict(item_meta))
        if fast is None:
            return generic

        def dec_fast(v: Any, path: str) -> tuple[Any, ...]:
            # One pass for the long lists (pool indices, a report's steps); anything
            # unusual goes the generic way, which names the offending item.
            if type(v) is list and min_len <= len(v) <= max_len and fast(v):
                return tuple(v) if args[0] is int else tuple(map(tuple, v))
            return generic(v, path)

        return dec_fast
    return _fixed_decoder([_decoder(a, inherited) for a in args])


def _fast_items(tp: Any, lim: dict[str, Any]) -> Callable[[list[Any]], bool] | None:
    """A whole-list check that passes only lists the generic decoder would accept unchanged."""
    if tp is int:
        ge, le, gt = lim.get("ge"), lim.get("le"), lim.get("gt")

        def ints(v: list[Any]) -> bool:
            if not all(type(x) is int for x in v):
                return False
            if not v:
                return True
            low, high = min(v), max(v)
            return ((ge is None or low >= ge) and (gt is None or low > gt)
                    and (le is None or high <= le))

        return ints
    if tp == tuple[int, float] and set(lim) <= {"gradient"}:
        # g - g == 0 is False for NaN and infinity.
        return lambda v: all(type(s) is list and len(s) == 2 and type(s[0]) is int
                             and type(s[1]) is float and s[1] - s[1] == 0.0 for s in v)
    return None


def _sequence_decoder(item: _Decoder, min_len: int, max_len: int) -> _Decoder:
    def dec(v: Any, path: str) -> tuple[Any, ...]:
        if type(v) is not list:
            raise SchemaError(f"{path}: expected a list, got {_kind(v)}")
        if len(v) > max_len:
            raise SchemaError(f"{path}: {len(v)} items exceed the limit of {max_len}",
                              code="too_large")
        if len(v) < min_len:
            raise SchemaError(f"{path}: {len(v)} items, at least {min_len} needed")
        return tuple(item(x, f"{path}[{i}]") for i, x in enumerate(v))

    return dec


def _fixed_decoder(items: list[_Decoder]) -> _Decoder:
    def dec_fixed(v: Any, path: str) -> tuple[Any, ...]:
        if type(v) is not list or len(v) != len(items):
            raise SchemaError(f"{path}: expected a list of {len(items)} items, got {_kind(v)}")
        return tuple(d(x, f"{path}[{i}]") for i, (d, x) in enumerate(zip(items, v, strict=True)))

    return dec_fixed


def _dataclass_decoder(cls: type) -> _Decoder:
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        meta = _limit_items(field_meta(cls, f))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, _decoder(hints[f.name], meta), required))
    names = {name for name, _, _ in fields}
    wanted = ", ".join(name for name, _, required in fields if required)

    def dec(v: Any, path: str) -> Any:
        if type(v) is not dict:
            raise SchemaError(f"{path}: expected a map with keys {wanted}, got {_kind(v)}")
        unknown = [k for k in v if k not in names]
        if unknown:
            raise SchemaError(
                f"{path}: unknown field(s) {sorted(map(str, unknown))}; {cls.__name__} has "
                f"{sorted(names)} (is the client speaking protocol v{PROTOCOL_VERSION}?)"
            )
        kwargs = {}
        for name, field_dec, required in fields:
            if name in v:
                kwargs[name] = field_dec(v[name], f"{path}.{name}")
            elif required:
                raise SchemaError(f"{path}.{name}: missing (required field of {cls.__name__})")
        try:
            return cls(**kwargs)
        except SchemaError as exc:
            raise SchemaError(f"{path}: {exc}", code=exc.code) from None
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"{path}: {exc}") from None

    return dec


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a bool"
    if v is None:
        return "nil"
    if isinstance(v, (int, float)):
        return f"{type(v).__name__} {v!r}"
    return type(v).__name__
