"""The start-up drift probe is kept in the client's state file: a second start-up with the same
model does not probe again, another model does, and a state file from before the field loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from client_support import tiny_text_config
from fixtures_text import make_tokenizer

from zorba_common.messages import HyperParams, RunInfo
from zorba_edge.client import assembly
from zorba_edge.client.state import ClientState, DriftRecord, StateStore
from zorba_edge.engine.drift_tolerance import PROBE_SETTINGS, DriftProbe
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import RandomInitSource

RUN = RunInfo("run-1", 7, 16, 3, "fp-abc", HyperParams(0.01, 0.001, 8, 64), 30.0, 5.0, 1e6)
RECORD = DriftRecord("key-a", 3.5, 0.004, (0.01, 0.012))


def state(client_id: str = "c-1") -> ClientState:
    return ClientState("http://127.0.0.1:8470", client_id, "token-xyz", RUN)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return make_tokenizer()


def source(tokenizer: Any, seed: int = 0) -> RandomInitSource:
    return RandomInitSource(tiny_text_config(tokenizer), seed=seed, tokenizer=tokenizer)


def counting_probe(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every probe that really runs (the model's fingerprint), still running it."""
    calls: list[str] = []
    real = assembly.probe_drift_tolerance

    def probe(src: Any, config: LoadConfig, **kwargs: Any) -> DriftProbe | None:
        calls.append(src.fingerprint)
        return real(src, config, **kwargs)

    monkeypatch.setattr(assembly, "probe_drift_tolerance", probe)
    return calls


def test_a_record_kept_before_registering_is_written_with_the_first_save(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.keep_drift(RECORD)  # measured before the first registration: no state file yet
    assert not store.exists()
    store.save(state())
    again = StateStore(tmp_path / "state.json")
    assert again.cached_drift("key-a") == RECORD
    assert again.cached_drift("key-b") is None  # measured for another model or setting


def test_a_new_registration_keeps_the_record(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(state("c-1"))
    store.keep_drift(RECORD)  # written into the existing file at once
    assert StateStore(store.path).cached_drift("key-a") == RECORD
    restarted = StateStore(store.path)
    restarted.save(state("c-2"))  # registered again: a new client id, the same device
    assert StateStore(store.path).cached_drift("key-a") == RECORD
    assert StateStore(store.path).load() == state("c-2")


def test_a_state_file_from_before_the_field_loads_and_measures_again(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(state())
    data = json.loads(store.path.read_text())
    assert "drift_probe" not in data  # nothing kept: the file is as an older client wrote it
    assert StateStore(store.path).load() == state()
    assert StateStore(store.path).cached_drift("key-a") is None


def test_an_unreadable_record_is_measured_again_not_an_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(state())
    data = json.loads(store.path.read_text())
    data["drift_probe"] = {"key": "key-a", "rises": "not numbers"}
    store.path.write_text(json.dumps(data))
    again = StateStore(store.path)
    assert again.load() == state()
    assert again.cached_drift("key-a") is None


def test_a_second_start_up_with_the_same_model_does_not_probe(
        tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_probe(monkeypatch)
    config = LoadConfig(train_dtype="fp32", frozen_dtype="fp32")
    store = StateStore(tmp_path / "state.json")
    first = assembly.cached_drift_tolerance(source(tokenizer), config, store)
    assert first is not None and len(calls) == 1
    store.save(state())  # registered; then the process stops
    second = assembly.cached_drift_tolerance(source(tokenizer), config,
                                             StateStore(tmp_path / "state.json"))
    assert len(calls) == 1
    assert second == first


def test_another_model_or_precision_probes_again(
        tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_probe(monkeypatch)
    store = StateStore(tmp_path / "state.json")
    fp32 = LoadConfig(train_dtype="fp32", frozen_dtype="fp32")
    assembly.cached_drift_tolerance(source(tokenizer, seed=0), fp32, store)
    other = source(tokenizer, seed=1)
    assembly.cached_drift_tolerance(other, fp32, store)
    assert calls == [source(tokenizer, seed=0).fingerprint, other.fingerprint]
    assembly.cached_drift_tolerance(other, LoadConfig(train_dtype="bf16", frozen_dtype="bf16"),
                                    store)
    assert len(calls) == 3
    assembly.cached_drift_tolerance(other, LoadConfig(train_dtype="bf16", frozen_dtype="bf16"),
                                    store)
    assert len(calls) == 3  # the last measurement is the one kept


@dataclass(frozen=True)
class _SettingsBeforeRunDirections:
    """ProbeSettings as they were while the probe drew its own torch.Generator directions."""

    radius: float = PROBE_SETTINGS.radius
    directions: int = PROBE_SETTINGS.directions
    seed: int = PROBE_SETTINGS.seed
    max_rise: float = PROBE_SETTINGS.max_rise
    max_attempts: int = PROBE_SETTINGS.max_attempts


def test_a_record_measured_along_the_old_directions_is_measured_again(
        tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config = LoadConfig(train_dtype="fp32", frozen_dtype="fp32")
    with monkeypatch.context() as patch:
        patch.setattr(assembly, "PROBE_SETTINGS", _SettingsBeforeRunDirections())
        old_key = assembly.drift_probe_key(source(tokenizer), config)
    assert assembly.drift_probe_key(source(tokenizer), config) != old_key
    store = StateStore(tmp_path / "state.json")
    store.save(state())
    store.keep_drift(DriftRecord(old_key, 3.5, 0.004, (0.01, 0.012)))  # an older client's
    calls = counting_probe(monkeypatch)
    measured = assembly.cached_drift_tolerance(source(tokenizer), config,
                                               StateStore(tmp_path / "state.json"))
    assert len(calls) == 1
    assert measured is not None and measured.rises != (0.01, 0.012)
