"""The client's state file: round trip, atomic replacement, torn saves and unreadable files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zorba_common.messages import HyperParams, RunInfo
from zorba_edge.client.errors import StateFileError
from zorba_edge.client.state import ClientState, StateStore, atomic_write
from zorba_edge.engine.coefficients import CoefficientTable

RUN = RunInfo("run-1", 7, 16, 3, "fp-abc", HyperParams(0.01, 0.001, 8, 64), 30.0, 5.0, 1e6)


def state() -> ClientState:
    return ClientState("http://127.0.0.1:8470", "c-1", "token-xyz", RUN)


def table(version: int = 4, seed: int = 0) -> CoefficientTable:
    values = np.random.default_rng(seed).normal(size=(RUN.pool_size, RUN.num_blocks))
    return CoefficientTable(RUN.pool_size, RUN.num_blocks, values, version)


def test_state_and_table_round_trip_exactly(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    assert store.load() is None
    saved = store.save(state(), table())
    loaded = store.load()
    assert loaded == saved
    assert loaded.run == RUN and loaded.alpha_version == 4
    restored = store.load_table(loaded)
    assert restored is not None and restored.version == 4
    np.testing.assert_array_equal(restored.values, table().values)


def test_the_state_file_is_private_to_its_user(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(state(), table())
    assert (store.path.stat().st_mode & 0o077) == 0  # it holds the bearer token


def test_a_crash_between_the_table_and_the_state_write_falls_back_to_a_catch_up(
        tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    old = store.save(state(), table(version=4, seed=0))
    # The sidecar of the next save (version 5) landed, the JSON naming it did not.
    newer = StateStore(tmp_path / "elsewhere" / "state.json")
    newer.save(state(), table(version=5, seed=1))
    atomic_write(store.table_path, newer.table_path.read_bytes())
    assert store.load() == old
    assert store.load_table(old) is None


def test_a_table_of_another_shape_is_not_used(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    other = RunInfo("run-1", 7, 8, 3, "fp-abc", RUN.hyper, 30.0, 5.0, 1e6)
    saved = store.save(state(), table())
    assert store.load_table(ClientState(saved.server_url, saved.client_id, saved.token, other,
                                        saved.alpha_version, saved.alpha_sha256)) is None


def test_a_state_without_a_table_asks_for_a_catch_up(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    saved = store.save(state())
    assert saved.alpha_sha256 == "" and store.load_table(saved) is None


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99}), json.dumps([1]),
                                     json.dumps({"format": 1, "server_url": "x"})])
def test_an_unreadable_state_file_says_what_to_do(tmp_path: Path, content: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(StateFileError, match="Delete it"):
        StateStore(path).load()


def test_atomic_write_never_leaves_a_partial_file_when_the_write_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_only_one_store_can_claim_a_state_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    first, second = StateStore(path), StateStore(path)
    first.claim()
    with pytest.raises(StateFileError) as err:
        second.claim()
    message = str(err.value)
    assert str(path) in message and "--state" in message and f"pid {os.getpid()}" in message
    StateStore(tmp_path / "other.json").claim()  # another file is another client
    first.release()
    second.claim()


HOLD = """
import sys, time
from zorba_edge.client.state import StateStore
store = StateStore(sys.argv[1])  # held while the store lives
store.claim()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_process_is_refused_until_the_holder_dies_even_by_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateFileError, match=f"in use by another zorba-edge client "
                                                 f"\\(pid {holder.pid}\\)"):
            StateStore(path).claim()
    finally:
        holder.kill()
        holder.wait()
    StateStore(path).claim()  # the kernel dropped the dead holder's lock; the file stays
    assert (tmp_path / "state.json.lock").exists()
