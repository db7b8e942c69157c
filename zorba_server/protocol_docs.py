"""The wire contract from one source: docs/protocol.md's reference tables and
docs/protocol.schema.json, generated from `zorba_common.messages` (and the `[run]` table
from `zorba_server.config.RunConfig`, the aggregation rules from `zorba_server.aggregation_rules`).

    python -m zorba_server.protocol_docs           # rewrite both files
    python -m zorba_server.protocol_docs --check   # exit 1 when either is stale

Each field's meaning, unit and limits are metadata on the dataclass field (`codec.wire`);
the decoder enforces the same metadata, so the documents cannot promise what the code does
not check. The generated parts of protocol.md sit between `<!-- generated:NAME -->` and
`<!-- end generated:NAME -->`; everything else in the file is written by hand.
"""

from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import functools
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from zorba_common import codec, limits, messages
from zorba_common.memory_model import ModelFootprint
from zorba_server.aggregation_rules import RULES, describe
from zorba_server.config import RunConfig
from zorba_server.status_fields import STATUS_FIELDS

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_MD = Path("docs/protocol.md")
SCHEMA_JSON = Path("docs/protocol.schema.json")

_FOOTPRINT = ModelFootprint((1000, 1000), (900, 900), 5000, 16, 100, 2, 32)
_HYPER = messages.HyperParams(1e-6, 1e-3, 8, 64)
_RUN = messages.RunInfo("run-3f2a", 42, 1024, 2, "sha256:9c1e", _HYPER, 300.0, 25.0, 1e6)
_ASSIGNMENT = messages.Assignment(7, 5, (1,), (17, 903, 17), _HYPER, 287.5, 1_764_000_000.0,
                                  measure_generic=True)
EXAMPLES: dict[type, Any] = {
    messages.RegisterRequest: messages.RegisterRequest("the-enrolment-secret", messages.DeviceProfile(
        "cpu", 3 * 2**30, 0.42, 2000, _FOOTPRINT, "sha256:9c1e", messages.MemoryProfile(),
        "laptop", base_rms=(0.0213, 0.0198))),
    messages.RegisterResponse: messages.RegisterResponse("c-5b1d", "tok-8f0e", _RUN),
    messages.NextRound: messages.NextRound(messages.TRAIN, 5, _ASSIGNMENT, (
        messages.AlphaDelta.from_matrix(5, 6, (4, 88), (0, 1), np.array([[1e-6, 0], [-2e-6, 5e-7]])),
    )),
    messages.Report: messages.Report("7d0c9a1e", 5, ((17, 0.125), (903, -0.5), (17, 0.03125)), 24,
                                 2.31, 2.25, 2_750_000_000, 0.44, loss_check=2.28,
                                 loss_generic=3.69),
    messages.ReportAck: messages.ReportAck(7, "7d0c9a1e", 1_764_000_123.5),
    messages.AlphaState: messages.AlphaState("run-3f2a", 5, 2, 2,
                                         np.array([[0.0, 1e-6], [-2e-6, 0.0]]).tobytes()),
    messages.ErrorBody: messages.ErrorBody("round_closed", "round 7 closed: its reports were "
                                       "aggregated without this one; poll for the next round"),
}


# ---------------------------------------------------------------------------- walking types


def message_types() -> list[type]:
    """Every dataclass on the wire, each top-level message followed by the ones it nests."""
    seen: list[type] = []

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp in seen:
                return
            seen.append(tp)
            hints = typing.get_type_hints(tp)
            for f in dataclasses.fields(tp):
                visit(hints[f.name])
        for arg in typing.get_args(tp):
            visit(arg)

    for message in messages.MESSAGES:
        visit(message)
    return seen


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any, dict[str, Any]]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)]


def _optional_inner(tp: Any) -> Any | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return None


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# ---------------------------------------------------------------------------- markdown


def _type_text(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_text(inner)} or nil"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"[`{tp.__name__}`](#{tp.__name__.lower()})"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"array of {_type_text(args[0])}"
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    return {int: "int", float: "float", str: "str", bool: "bool", bytes: "bin"}[tp]


def _number(v: float) -> str:
    if isinstance(v, int) and v >= 2**16 and (v & (v - 1) == 0 or (v + 1) & v == 0):
        exponent = v.bit_length() - (v & (v - 1) == 0)
        return f"2^{exponent}" if v & (v - 1) == 0 else f"2^{exponent} - 1"
    return f"{v:g}" if isinstance(v, float) else f"{v:,}"


def _limits_text(tp: Any, meta: dict[str, Any]) -> str:
    tp = _optional_inner(tp) or tp
    parts = []
    if "choices" in meta:
        parts.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    for key, sign in (("gt", ">"), ("ge", ">="), ("le", "<=")):
        if key in meta:
            parts.append(f"{sign} {_number(meta[key])}")
    if tp is float:
        parts.append("finite" + (" (else 422 `invalid_scalar`)" if meta.get("gradient") else ""))
    sequence = typing.get_origin(tp) is tuple and typing.get_args(tp)[-1] is Ellipsis
    unit = {str: "chars", bytes: "bytes"}.get(tp, "items" if sequence else "")
    if unit and "choices" not in meta:
        if meta.get("min_len"):
            parts.append(f"at least {meta['min_len']} {unit}")
        default = limits.MAX_STR_LEN if tp is str else limits.MAX_SEQUENCE_LEN
        parts.append(f"at most {_number(meta.get('max_len') or default)} {unit}")
    if sequence:
        item = dict(meta.get("item", ()))
        item_text = _limits_text(typing.get_args(tp)[0], item | {"gradient": meta.get("gradient")}
                                 if meta.get("gradient") else item)
        if item_text:
            parts.append(f"each item: {item_text}")
    return "; ".join(parts)


def _default_text(f: dataclasses.Field[Any]) -> str:
    if _required(f):
        return "required"
    value = f.default
    if dataclasses.is_dataclass(value):
        return "optional: every field at its default"
    if value is None:
        return "optional: nil"
    if value == ():
        return "optional: `[]`"
    if value == b"":
        return "optional: empty"
    return f"optional: `{json.dumps(value)}`"


def message_tables() -> str:
    out = []
    for cls in message_types():
        doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        out += [f"#### {cls.__name__}", "", doc, "",
                "| Field | Type | Unit | Required / default | Limits | Meaning |",
                "|---|---|---|---|---|---|"]
        for f, tp, meta in _fields(cls):
            cells = [f"`{f.name}`", _type_text(tp), meta.get("unit", ""), _default_text(f),
                     _limits_text(tp, meta), meta.get("doc", "")]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        example = EXAMPLES.get(cls)
        if example is not None:
            body = codec.encode(example)
            out += ["", f"Example (JSON view; `bin` fields shown as base64), {len(body)} bytes "
                    "of msgpack:", "", "```json", _json_view(example), "```", "",
                    "```text", _hex(body), "```"]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _json_view(message: Any) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, bytes):
            return base64.b64encode(v).decode()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    text = json.dumps(plain(msgpack.unpackb(codec.encode(message))), indent=1)
    # Short arrays of numbers on one line: the examples stay readable.
    return re.sub(r"\[\s+([-\d.e, \n]+?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def _hex(body: bytes) -> str:
    return "\n".join(body[i:i + 32].hex(" ") for i in range(0, len(body), 32))


def run_table() -> str:
    """The `[run]` keys: name, default, meaning (the field docstrings of RunConfig)."""
    docs = _attribute_docs(RunConfig)
    out = ["| Key | Default | Meaning |", "|---|---|---|"]
    for f in dataclasses.fields(RunConfig):
        default = "none" if f.default is None else f"`{json.dumps(f.default)}`"
        if f.name == "footprint":
            default = "none (a `[run.footprint]` table)"
        out.append(f"| `{f.name}` | {default} | {docs.get(f.name, '')} |")
    return "\n".join(out) + "\n"


def status_table() -> str:
    """The fields of GET /v1/status (zorba_server/status_fields.py)."""
    out = ["| Field | Meaning |", "|---|---|"]
    out += [f"| `{name}` | {meaning} |" for name, meaning in STATUS_FIELDS.items()]
    return "\n".join(out) + "\n"


def aggregation_table() -> str:
    """The registered aggregation rules: `aggregation.method` and what the rule computes."""
    out = ["| `aggregation.method` | Per (k, b), alpha[k, b] += lr x |", "|---|---|"]
    out += [f"| `{name}` | {describe(rule)} |" for name, rule in RULES.items()]
    return "\n".join(out) + "\n"


def _attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings written under dataclass fields (kept in source, read from it)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


# ---------------------------------------------------------------------------- JSON Schema


def _json_type(tp: Any, meta: dict[str, Any]) -> dict[str, Any]:
    inner = _optional_inner(tp)
    if inner is not None:
        return {"anyOf": [_json_type(inner, meta), {"type": "null"}]}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return {"$ref": f"#/$defs/{tp.__name__}"}
    out: dict[str, Any] = {}
    bounds = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = dict(meta.get("item", ())) | ({"gradient": True} if meta.get("gradient") else {})
            out = {"type": "array", "items": _json_type(args[0], item),
                   "maxItems": meta.get("max_len") or limits.MAX_SEQUENCE_LEN}
            if meta.get("min_len"):
                out["minItems"] = meta["min_len"]
            return out
        inherited = {"gradient": True} if meta.get("gradient") else {}
        return {"type": "array", "prefixItems": [_json_type(a, inherited) for a in args],
                "items": False, "minItems": len(args), "maxItems": len(args)}
    if tp is bool:
        return {"type": "boolean"}
    if tp in (int, float):
        out = {"type": "integer" if tp is int else "number"}
        out |= {bounds[k]: meta[k] for k in bounds if k in meta}
        if meta.get("gradient"):
            out["x-nonFiniteError"] = "invalid_scalar"
        return out
    if tp is str:
        if "choices" in meta:
            return {"type": "string", "enum": list(meta["choices"])}
        out = {"type": "string", "maxLength": meta.get("max_len") or limits.MAX_STR_LEN}
        if meta.get("min_len"):
            out["minLength"] = meta["min_len"]
        return out
    if tp is bytes:
        return {"x-msgpack": "bin", "x-maxBytes": meta.get("max_len") or limits.MAX_SEQUENCE_LEN}
    raise TypeError(f"no JSON Schema for {tp!r}")


def json_schema() -> dict[str, Any]:
    defs = {}
    for cls in message_types():
        props, required = {}, []
        for f, tp, meta in _fields(cls):
            prop = _json_type(tp, meta)
            if meta.get("doc"):
                prop = {"description": meta["doc"], **prop}
            if meta.get("unit"):
                prop["x-unit"] = meta["unit"]
            if _required(f):
                required.append(f.name)
            elif isinstance(f.default, bytes):
                prop["default"] = f.default.decode("ascii")  # only b"": no bin default has bytes
            elif not dataclasses.is_dataclass(f.default):
                prop["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
            props[f.name] = prop
        doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        defs[cls.__name__] = {"type": "object", "description": doc, "properties": props,
                              "required": required, "additionalProperties": False}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"zorba-edge wire protocol v{messages.PROTOCOL_VERSION}",
        "description": (
            "Every body is one msgpack map (Content-Type: application/msgpack) whose structure "
            "this schema states in JSON terms. `x-msgpack: bin` marks msgpack binary fields "
            "(limit `x-maxBytes`); integers are msgpack ints (a bool is not one); a float "
            "field also takes an int; no NaN or infinity anywhere; a map must not repeat a "
            "key. Generated by `python -m zorba_server.protocol_docs`: do not edit."),
        "oneOf": [{"$ref": f"#/$defs/{m.__name__}"} for m in messages.MESSAGES],
        "$defs": defs,
    }


# ---------------------------------------------------------------------------- files


def render_protocol_md(text: str) -> str:
    """`text` with every generated section replaced by what the code says now."""
    for name, content in (("messages", message_tables()), ("run-keys", run_table()),
                          ("aggregation-rules", aggregation_table()),
                          ("status-fields", status_table())):
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- end generated:{name} -->)",
                             re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{PROTOCOL_MD}: no <!-- generated:{name} --> section")
        text = pattern.sub(functools.partial(_between_markers, content=content), text)
    return text


def _between_markers(match: re.Match[str], content: str) -> str:
    return match.group(1) + content + match.group(2)


def render_schema_json() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def stale_files(root: Path = ROOT) -> list[Path]:
    """The generated files that differ from what the code would generate now."""
    md = root / PROTOCOL_MD
    stale = [] if render_protocol_md(md.read_text()) == md.read_text() else [md]
    js = root / SCHEMA_JSON
    if not js.exists() or js.read_text() != render_schema_json():
        stale.append(js)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zorba_server.protocol_docs",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 when a generated file is stale")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_files(args.root)
        for path in stale:
            print(f"{path} is stale: run python -m zorba_server.protocol_docs", file=sys.stderr)
        return 1 if stale else 0
    md = args.root / PROTOCOL_MD
    md.write_text(render_protocol_md(md.read_text()))
    (args.root / SCHEMA_JSON).write_text(render_schema_json())
    print(f"wrote {md} and {args.root / SCHEMA_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
