"""The documented contract is the coded one: docs/protocol.md's reference and
docs/protocol.schema.json are generated from the schema and must be current."""

from __future__ import annotations

import dataclasses
import json
import shutil
import types
from pathlib import Path

import pytest

from zorba_common import codec, limits, messages, run_defaults
from zorba_common.memory_model import ModelFootprint
from zorba_server import calibration, cli, protocol_docs

ROOT = Path(__file__).resolve().parent.parent


def test_the_generated_docs_and_json_schema_match_the_code() -> None:
    stale = protocol_docs.stale_files(ROOT)
    assert stale == [], f"{stale}: run python -m zorba_server.protocol_docs"
    assert protocol_docs.main(["--check"]) == 0


def _copy_docs(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    for name in (protocol_docs.PROTOCOL_MD, protocol_docs.SCHEMA_JSON):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_a_hand_edited_table_is_caught(tmp_path: Path) -> None:
    root = _copy_docs(tmp_path)
    md = root / protocol_docs.PROTOCOL_MD
    md.write_text(md.read_text().replace("| `loss_mean` | float | nats |",
                                         "| `loss_mean` | int | nats |", 1))
    assert protocol_docs.stale_files(root) == [md]
    assert protocol_docs.main(["--check", "--root", str(root)]) == 1
    assert protocol_docs.main(["--root", str(root)]) == 0  # regenerating repairs it
    assert protocol_docs.stale_files(root) == []


def test_a_changed_limit_in_the_code_makes_both_files_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_docs(tmp_path)
    # The footprint's limits are declared on its own fields (memory_model.py), as a message's.
    hidden = next(f for f in dataclasses.fields(ModelFootprint) if f.name == "hidden_size")
    monkeypatch.setattr(hidden, "metadata", types.MappingProxyType(
        codec.wire("Width of the residual stream.", ge=1, le=2**20)))
    assert set(protocol_docs.stale_files(root)) == {root / protocol_docs.PROTOCOL_MD,
                                                    root / protocol_docs.SCHEMA_JSON}


def test_every_field_of_every_message_is_documented() -> None:
    undocumented = [f"{cls.__name__}.{f.name}" for cls in protocol_docs.message_types()
                    for f in dataclasses.fields(cls) if not f.metadata.get("doc")]
    assert undocumented == []


@pytest.mark.parametrize("message", messages.MESSAGES, ids=lambda m: m.__name__)
def test_every_message_has_an_example_that_decodes_as_itself(message: type) -> None:
    example = protocol_docs.EXAMPLES[message]
    assert codec.decode(message, codec.encode(example), max_bytes=limits.MAX_REPORT_BYTES) \
        == example
    md = (ROOT / protocol_docs.PROTOCOL_MD).read_text()
    assert protocol_docs._hex(codec.encode(example)) in md


def test_the_json_schema_states_the_decoders_limits() -> None:
    doc = json.loads((ROOT / protocol_docs.SCHEMA_JSON).read_text())
    report = doc["$defs"]["Report"]
    assert report["additionalProperties"] is False
    assert set(report["required"]) == {f.name for f in dataclasses.fields(messages.Report)
                                       if f.default is dataclasses.MISSING}
    assert "loss_check" in report["properties"] and "loss_check" not in report["required"]
    assert report["properties"]["loss_mean"]["maximum"] == limits.MAX_LOSS
    assert report["properties"]["peak_memory_bytes"]["maximum"] == limits.MAX_MEMORY_BYTES
    steps = report["properties"]["steps"]
    assert steps["maxItems"] == limits.MAX_STEPS_PER_REPORT
    assert steps["items"]["prefixItems"][1]["x-nonFiniteError"] == "invalid_scalar"
    footprint = doc["$defs"]["ModelFootprint"]["properties"]
    assert footprint["block_params"]["minItems"] == 1
    assert doc["$defs"]["RunInfo"]["properties"]["mode"]["enum"] == list(run_defaults.RUN_MODES)


def test_the_calibration_rule_documented_is_the_one_that_runs() -> None:
    md = " ".join((ROOT / protocol_docs.PROTOCOL_MD).read_text().split())
    assert (f"clamped to [{calibration.CALIBRATION_MIN:g}, {calibration.CALIBRATION_MAX:g}]"
            in md)
    assert f"an EMA of {calibration.CALIBRATION_EMA:g}" in md
    assert "calibration <- ratio` if `ratio >= calibration`" in md
    assert "(calibration + peak / predicted) / 2" not in md  # the old, wrong rule


def test_min_clients_means_the_same_in_the_help_and_the_docs(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--min-clients MIN_CLIENTS active clients (seen within run.member_timeout_s) " \
           "needed before any round opens" in help_text
    md = " ".join((ROOT / protocol_docs.PROTOCOL_MD).read_text().split())
    assert "at least `run.min_clients` clients are active (seen within `run.member_timeout_s`" \
        in md


def test_every_run_key_and_its_default_is_documented() -> None:
    md = (ROOT / protocol_docs.PROTOCOL_MD).read_text()
    from zorba_server.config import RunConfig

    for f in dataclasses.fields(RunConfig):
        default = "none" if f.default is None else f"`{json.dumps(f.default)}`"
        assert f"| `{f.name}` | {default}" in md, f.name


def _paths(value: object, prefix: str = "") -> set[str]:
    """Every field path of a status document (`a.b`, `a[].b`), as status_fields names them."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, inner in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            if key not in ("excluded",):  # a map of client ids, not fields
                paths |= _paths(inner, path)
    elif isinstance(value, list):
        for item in value:
            paths |= _paths(item, f"{prefix}[]")
    return paths


def test_every_status_field_is_documented_and_every_documented_one_exists(tmp_path: Path) -> None:
    """The status of a run with a member, a closed round and an open one: its field names are
    those of zorba_server/status_fields.py, no more, no fewer."""
    from engine_fakes import engine, join, open_next, received

    from zorba_server.status_fields import STATUS_FIELDS
    from zorba_server.status_view import run_status

    e = engine(tmp_path)
    join(e, "a", base_rms=(0.02, 0.02, 0.02, 0.02))  # a client that feeds the drift bound and
    open_next(e)                                     # the fluency watch: their fields show
    e.accept_report(received(e, "a", loss_generic=3.5))
    e.apply_close(e.decide_close(now=1.0))
    open_next(e, now=2.0)
    counters = {"registrations": 1, **e.counters()}
    status = run_status(e, "run", counters, now=3.0)
    found = {p for p in _paths(status) if not p.startswith("current_round.excluded.")}
    assert found == set(STATUS_FIELDS), (found ^ set(STATUS_FIELDS))
