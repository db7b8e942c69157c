"""Strict msgpack encoding and decoding of message dataclasses (docs/design.md §6).

Whatever a peer sends reaches the coefficient table, so decoding is strict: unknown or
missing keys, a wrong type (a bool where an int goes, a str where bytes go), a NaN or
infinite float, a string or list over its length limit, or a body over its byte limit is a
`SchemaError` that names the field and what to send instead. A message is any frozen
dataclass whose fields carry `wire()` metadata; this module knows no particular message
(zorba_common.messages holds them).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sized
from functools import cache
from typing import Any, TypeVar

import msgpack

from zorba_common.errors import ZorbaError
from zorba_common.limits import MAX_SEQUENCE_LEN, MAX_STR_LEN

CONTENT_TYPE = "application/msgpack"

T = TypeVar("T")

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
         gradient: bool = False, choices: tuple[str, ...] | None = None,
         omit_default: bool = False) -> dict[str, Any]:
    """Field metadata: what the field means (doc, unit) and what the decoder enforces.

    `min_len`/`max_len` bound a string, bytes or list; `ge`/`gt`/`le` bound a number; `item` holds
    the bounds of each item of a list (`wire(ge=1)`); `choices` lists a string's allowed
    values; `gradient` marks the projected
    gradients, whose non-finite values are `invalid_scalar` (422) rather than
    `invalid_message` (400). `omit_default`: the encoder leaves the field out while it holds
    its default (the decoder fills it in), so a peer of an older protocol revision, whose
    strict decoder knows no such field, keeps working until the field is used. docs/protocol.md
    and docs/protocol.schema.json are generated from this metadata
    (`python -m zorba_server.protocol_docs`).
    """
    limits = {"min_len": min_len, "max_len": max_len, "ge": ge, "le": le, "gt": gt,
              "gradient": gradient or None, "choices": choices,
              "item": None if item is None else _limit_items(item)}
    return {"doc": doc, "unit": unit, **({"omit_default": True} if omit_default else {}),
            **{k: v for k, v in limits.items() if v is not None}}


def _limit_items(meta: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The decoder-relevant part of field metadata, hashable (decoders are cached on it)."""
    return tuple(sorted((k, v) for k, v in meta.items() if k in _LIMIT_KEYS and v is not None))


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
    omitted = _omitted_at_default(type(value))  # type: ignore[arg-type]
    return {name: getattr(value, name) for name in names
            if name not in omitted or getattr(value, name) != omitted[name]}


@cache
def _omitted_at_default(cls: type) -> dict[str, Any]:
    """The fields of `cls` left out while they hold their default (`wire(omit_default=True)`)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("omit_default")}


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
        meta = _limit_items(f.metadata)
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
                f"{sorted(names)} (is the sender speaking another protocol version?)"
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
