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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import msgpack
import numpy as np

from zorba_edge.common.memory_model import MemorySettings, ModelFootprint
from zorba_edge.errors import ZorbaError

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


class SchemaError(ZorbaError, ValueError):
    """A body that is not a valid message of this protocol; `code` is the wire error code."""

    def __init__(self, message: str, *, code: str = "invalid_message") -> None:
        super().__init__(message)
        self.code = code


def limits(*, max_len: int | None = None, ge: float | None = None, le: float | None = None,
           gt: float | None = None) -> dict[str, Any]:
    """Field metadata read by the decoder: a length limit and numeric bounds."""
    return {"max_len": max_len, "ge": ge, "le": le, "gt": gt}


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ErrorBody:
    """Body of every 4xx/5xx answer."""

    error: str
    """Stable machine-readable code, e.g. `round_closed`, `invalid_scalar`."""
    message: str = field(metadata=limits(max_len=4096))
    """What was wrong and what to do, for people."""


@dataclass(frozen=True)
class MemoryProfile:
    """How the device holds the model: the device-side half of `MemorySettings`.

    The run fixes batch size and sequence length and the server learns the calibration
    from measured peaks, so those are not the client's to send.
    """

    train_dtype: str = "fp32"
    frozen_dtype: str = "nf4"
    frozen_other_dtype: str = "fp32"
    embed_dtype: str = "fp32"
    snapshot_dtype: str | None = "fp32"
    runtime_bytes: int = field(default=350 * 2**20, metadata=limits(ge=0))

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

    device_type: str
    """`cpu`, `cuda`, `mps`, ...: for people and metrics."""
    memory_budget_bytes: int = field(metadata=limits(gt=0))
    """Free memory measured at start-up, less the client's safety margin."""
    step_time_s: float = field(metadata=limits(gt=0))
    """Measured seconds per local step (two forward passes) on this device."""
    num_samples: int = field(metadata=limits(gt=0))
    """Local training examples: the client's aggregation and coverage weight w_n."""
    footprint: ModelFootprint
    model_fingerprint: str
    """Identifies the base model (weights and tokenizer); every client of a run must match."""
    memory: MemoryProfile = MemoryProfile()
    name: str = ""
    """Optional label for the status page."""


@dataclass(frozen=True)
class RegisterRequest:
    """POST /v1/clients."""

    enrolment_secret: str
    profile: DeviceProfile
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class HyperParams:
    lr: float = field(metadata=limits(gt=0))
    mu: float = field(metadata=limits(gt=0))
    batch_size: int = field(metadata=limits(ge=1))
    seq_len: int = field(metadata=limits(ge=1))


@dataclass(frozen=True)
class RunInfo:
    """The run a client joined: what it needs to build the same directions and model."""

    run_id: str
    seed: int = field(metadata=limits(ge=0))
    """Run seed of the noise z[k, b] (zorba_edge.common.noise)."""
    pool_size: int = field(metadata=limits(ge=1))
    num_blocks: int = field(metadata=limits(ge=1))
    model_fingerprint: str
    hyper: HyperParams
    round_duration_s: float = field(metadata=limits(gt=0))
    poll_timeout_s: float = field(metadata=limits(gt=0))
    max_abs_scalar: float = field(metadata=limits(gt=0))
    """Reports with a projected gradient beyond this magnitude are refused."""
    mode: str = ZORBA
    """One of RUN_MODES; a client of an older server (no field) runs `zorba`."""


@dataclass(frozen=True)
class RegisterResponse:
    client_id: str
    token: str
    """Bearer token for every later request; the server keeps only its hash."""
    run: RunInfo


@dataclass(frozen=True)
class AlphaDelta:
    """One applied round: alpha[k, b] += values[i, j] for k = pool_indices[i], b = blocks[j].

    A client syncs by `theta[b] -= value * z[k, b]` for every entry whose block it holds.
    """

    version: int = field(metadata=limits(ge=1))
    """The alpha version this delta produces (versions count applied rounds)."""
    round: int = field(metadata=limits(ge=1))
    pool_indices: tuple[int, ...]
    """Distinct, ascending."""
    blocks: tuple[int, ...]
    """Distinct, ascending."""
    values: bytes = field(metadata=limits(max_len=MAX_SEQUENCE_LEN * 256 * 4))
    """float32 little-endian, len(pool_indices) x len(blocks), row-major."""

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

    round: int = field(metadata=limits(ge=1))
    base_version: int = field(metadata=limits(ge=0))
    """The alpha version the round trains on; the client must be synced to it."""
    blocks: tuple[int, ...]
    """The activated blocks; every other block stays frozen."""
    pool_indices: tuple[int, ...]
    """One pool index per local step, in order (k_t for step t)."""
    hyper: HyperParams
    deadline_in_s: float
    """Seconds from the answer to the round's deadline (use this, not the wall clock)."""
    deadline_unix: float


WAIT, TRAIN, FINISHED = "wait", "train", "finished"


@dataclass(frozen=True)
class NextRound:
    """GET /v1/rounds/next."""

    status: str
    """`train` (assignment set), `wait` (poll again), `finished` (the run is over)."""
    version: int = field(metadata=limits(ge=0))
    """The server's alpha version now."""
    assignment: Assignment | None = None
    deltas: tuple[AlphaDelta, ...] = ()
    """From the client's version to the assignment's base version (or to `version`)."""
    catch_up: bool = False
    """The gap is too large for deltas: fetch GET /v1/state, then poll again."""
    retry_after_s: float = 0.0
    reason: str = field(default="", metadata=limits(max_len=4096))

    def __post_init__(self) -> None:
        if self.status not in (WAIT, TRAIN, FINISHED):
            raise SchemaError(f"status: {self.status!r} is not one of train, wait, finished")
        if (self.status == TRAIN) != (self.assignment is not None):
            raise SchemaError("status: an assignment comes with status 'train' and only then")


@dataclass(frozen=True)
class Report:
    """POST /v1/rounds/{round}/reports: what a client measured in one round."""

    idempotency_key: str = field(metadata=limits(max_len=128))
    """Client-chosen, unique per report: a retry with the same key and content is safe."""
    base_version: int = field(metadata=limits(ge=0))
    """The alpha version the client trained on."""
    steps: tuple[tuple[int, float], ...] = field(metadata=limits(max_len=MAX_STEPS_PER_REPORT))
    """(k_t, g_t) per local step, in step order: a prefix of the assignment's pool indices
    (at least one; none in the fedavg baseline, whose training travels as weights)."""
    num_samples: int = field(metadata=limits(ge=0))
    """Examples seen this round (the aggregation weight is the registered sample count)."""
    loss_mean: float
    loss_last: float
    peak_memory_bytes: int = field(metadata=limits(ge=0))
    """Measured peak of the round (0: not measured)."""
    step_time_s: float = field(metadata=limits(ge=0))

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            raise SchemaError("idempotency_key: must not be empty (use a fresh random string)")


@dataclass(frozen=True)
class ReportAck:
    """2xx answer to a report; a retry with the same key gets the very same ack."""

    round: int
    idempotency_key: str = field(metadata=limits(max_len=128))
    received_at: float


@dataclass(frozen=True)
class AlphaState:
    """GET /v1/state: the whole coefficient table."""

    run_id: str
    version: int = field(metadata=limits(ge=0))
    pool_size: int = field(metadata=limits(ge=1))
    num_blocks: int = field(metadata=limits(ge=1))
    alpha: bytes = field(metadata=limits(max_len=MAX_RESPONSE_BYTES))
    """float64 little-endian, pool_size x num_blocks, row-major (alpha[k, b] at k*B + b)."""

    def __post_init__(self) -> None:
        expected = 8 * self.pool_size * self.num_blocks
        if len(self.alpha) != expected:
            raise SchemaError(
                f"alpha: {len(self.alpha)} bytes, expected {expected} (float64 K x B)")

    def matrix(self) -> np.ndarray:
        return np.frombuffer(self.alpha, dtype="<f8").reshape(self.pool_size, self.num_blocks)


# ---------------------------------------------------------------------------- encoding


def encode(message: Any) -> bytes:
    """The msgpack body of a message dataclass."""
    # msgpack packs tuples as arrays itself and calls `default` only for what it does not
    # know (our dataclasses): no Python-level walk over long lists of numbers.
    return msgpack.packb(message, default=_as_map, use_bin_type=True)


def _as_map(value: Any) -> dict[str, Any]:
    names = _field_names(type(value))
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
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise SchemaError(
            f"body is not valid msgpack ({type(exc).__name__}: {exc}); send one msgpack map "
            f"encoded as {cls.__name__}"
        ) from None
    return from_wire(cls, obj)


def from_wire(cls: type[T], obj: Any) -> T:
    """Validate an already-unpacked msgpack object as message `cls`."""
    return _decoder(cls)(obj, cls.__name__)


_Decoder = Callable[[Any, str], Any]


@cache
def _decoder(tp: Any, meta: tuple[tuple[str, Any], ...] = ()) -> _Decoder:
    """A decoder for type `tp`, built once per (type, field limits) and cached."""
    lim = dict(meta)
    if dataclasses.is_dataclass(tp):
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
    if tp is str:
        return _sized(str, "a string", lim.get("max_len") or MAX_STR_LEN)
    if tp is bytes:
        return _sized(bytes, "binary (msgpack bin)", lim.get("max_len") or MAX_SEQUENCE_LEN)
    raise TypeError(f"no wire decoder for {tp!r}")


def _exact(kind: type, wanted: str) -> _Decoder:
    def dec(v: Any, path: str) -> Any:
        if type(v) is not kind:
            raise SchemaError(f"{path}: expected {wanted}, got {_kind(v)}")
        return v

    return dec


def _sized(kind: type, wanted: str, max_len: int) -> _Decoder:
    def dec(v: Any, path: str) -> Any:
        if type(v) is not kind:
            raise SchemaError(f"{path}: expected {wanted}, got {_kind(v)}")
        if len(v) > max_len:
            raise SchemaError(f"{path}: length {len(v)} exceeds the limit of {max_len}",
                              code="too_large")
        return v

    return dec


def _number_decoder(kind: type, lim: dict[str, Any]) -> _Decoder:
    ge, le, gt = lim.get("ge"), lim.get("le"), lim.get("gt")

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
            if not math.isfinite(v):
                raise SchemaError(
                    f"{path}: {v} is not a finite number; the sender must not produce NaN or "
                    "infinity (for a projected gradient: lower lr or check mu and the loss)",
                    code="invalid_scalar",
                )
        if ge is not None and v < ge:
            raise SchemaError(f"{path}: {v} is below the minimum {ge}")
        if gt is not None and v <= gt:
            raise SchemaError(f"{path}: {v} must be greater than {gt}")
        if le is not None and v > le:
            raise SchemaError(f"{path}: {v} is above the maximum {le}")
        return v

    return dec


def _tuple_decoder(args: tuple[Any, ...], lim: dict[str, Any]) -> _Decoder:
    if len(args) == 2 and args[1] is Ellipsis:
        # Limits of the field apply to the sequence; its items get the default limits.
        generic = _sequence_decoder(_decoder(args[0]), lim.get("max_len") or MAX_SEQUENCE_LEN)
        fast = _FAST_ITEMS.get(args[0])
        if fast is None:
            return generic
        max_len = lim.get("max_len") or MAX_SEQUENCE_LEN

        def dec_fast(v: Any, path: str) -> tuple[Any, ...]:
            # One pass for the long lists (pool indices, a report's steps); anything
            # unusual goes the generic way, which names the offending item.
            if type(v) is list and len(v) <= max_len and all(map(fast, v)):
                return tuple(v) if args[0] is int else tuple(map(tuple, v))
            return generic(v, path)

        return dec_fast
    return _fixed_decoder([_decoder(a) for a in args])


_FAST_ITEMS: dict[Any, Callable[[Any], bool]] = {
    int: lambda x: type(x) is int,
    # g - g == 0 is False for NaN and infinity.
    tuple[int, float]: lambda s: (type(s) is list and len(s) == 2 and type(s[0]) is int
                                  and type(s[1]) is float and s[1] - s[1] == 0.0),
}


def _sequence_decoder(item: _Decoder, max_len: int) -> _Decoder:
    def dec(v: Any, path: str) -> tuple[Any, ...]:
        if type(v) is not list:
            raise SchemaError(f"{path}: expected a list, got {_kind(v)}")
        if len(v) > max_len:
            raise SchemaError(f"{path}: {len(v)} items exceed the limit of {max_len}",
                              code="too_large")
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
        meta = tuple(sorted((k, v) for k, v in f.metadata.items() if v is not None))
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
