"""The client's small durable state: who it is on which server, and its copy of alpha.

`state.json` holds the client id, bearer token, server URL, the run it joined and the
alpha version it last synced to; a sidecar `state.alpha.npy` holds the local coefficient
table, so a restarted client resumes from its own copy instead of downloading the whole
table. Both are written atomically (temporary file, fsync, os.replace): a crash at any
moment leaves the previous or the new version, never a torn file. The sidecar is written
first and the JSON names its SHA-256, so a crash between the two is detected on load (the
sidecar does not match) and the client falls back to a catch-up from the server.

One client process holds a state file at a time (`StateStore.claim`, an flock on
`state.json.lock` beside it, released when the process exits however it exits): two
clients sharing one file would both act as the same client id.

The state file also keeps the start-up drift probe's result (`DriftRecord`) under a key of
what determined it (model, precisions, device, probe settings and text): the probe costs ~18 s
on SmolLM2 and ~70 s on Gemma 3, and a restart or a re-registration with the same model reuses
it. It belongs to the device and model, not to the run: a new registration keeps it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zorba_common.codec import SchemaError, from_wire
from zorba_common.messages import RunInfo
from zorba_common.readout import table_columns
from zorba_edge.client.errors import StateFileError

if TYPE_CHECKING:  # the engine imports torch; the CLI's parser must not need it
    from zorba_edge.engine.coefficients import CoefficientTable

log = logging.getLogger("zorba_edge.client")

STATE_FORMAT = 1


@dataclass(frozen=True)
class ClientState:
    server_url: str
    client_id: str
    token: str
    run: RunInfo
    alpha_version: int = 0
    """Version of the saved table (0 with none saved)."""
    alpha_sha256: str = ""
    """SHA-256 of the sidecar file's bytes; empty when no table is saved."""
    memory_floor: float = 1.0
    """The smallest measured peak / memory model ratio of this registration's acknowledged
    reports, or 1 if that is larger: the server never plans this client with a calibration
    below it, so the client checks its assignments at it (zorba_edge.client.admission.
    AssignmentCheck). Kept across restarts, with the registration it belongs to."""


@dataclass(frozen=True)
class DriftRecord:
    """A start-up drift probe's measurements (zorba_edge.engine.drift_tolerance.DriftProbe)
    and the key of what determined them (zorba_edge.client.assembly.drift_probe_key)."""

    key: str
    base_loss: float
    move: float
    rises: tuple[float, ...]

    @classmethod
    def from_json(cls, data: Any) -> DriftRecord:
        rises = tuple(float(r) for r in data["rises"])
        if not isinstance(data["key"], str) or not rises:
            raise ValueError("a drift record needs a key and at least one rise")
        return cls(data["key"], float(data["base_loss"]), float(data["move"]), rises)


def default_state_path() -> Path:
    """`$ZORBA_EDGE_HOME/state.json`, by default `~/.zorba-edge/state.json`."""
    home = os.environ.get("ZORBA_EDGE_HOME")
    return (Path(home) if home else Path.home() / ".zorba-edge") / "state.json"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers see the old or the new bytes, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles to sync)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Reads and writes one client's state file and its alpha sidecar."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.table_path = self.path.with_suffix(".alpha.npy")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None
        self._drift: DriftRecord | None = None
        self._drift_read = False

    def claim(self) -> None:
        """Hold the state file for this process, or raise StateFileError naming its holder.

        The lock lives on an open file descriptor, so the kernel releases it when the process
        ends, even by SIGKILL: a stale lock file never blocks the next start. A forked child
        inherits the lock; claiming again there records the child as the holder.
        """
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
            return
        if os.name != "posix":  # no flock there; one client per state file is then up to you
            log.warning("cannot lock %s on this platform: run one client per state file",
                        self.path)
            return
        import fcntl  # POSIX only

        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateFileError(
                f"{self.path} is in use by another zorba-edge client (pid {holder}). A second "
                f"client on this machine needs its own state file: start it with --state "
                f"OTHER.json (or stop the first one)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # A store dropped without release() (a command run in-process, e.g. by tests) lets go.
        self._unlock = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Let another process claim the state file (exiting does the same)."""
        if self._lock_fd is not None:
            self._unlock()  # closing the descriptor drops the flock
            self._lock_fd = None

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> ClientState | None:
        """The saved state, None when there is none; StateFileError when it is unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(
                f"{self.path}: cannot read the client state ({exc.strerror})") from None
        try:
            data = json.loads(text)
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {STATE_FORMAT}")
            return ClientState(
                server_url=_str(data, "server_url"), client_id=_str(data, "client_id"),
                token=_str(data, "token"), run=from_wire(RunInfo, data["run"]),
                alpha_version=int(data.get("alpha_version", 0)),
                alpha_sha256=str(data.get("alpha_sha256", "")),
                memory_floor=_floor(data.get("memory_floor", 1.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError, SchemaError) as exc:
            raise StateFileError(
                f"{self.path} is not a zorba-edge client state ({exc}). Delete it (and "
                f"{self.table_path.name}) to register as a new client, or use another --state file"
            ) from None

    def cached_drift(self, key: str) -> DriftRecord | None:
        """The drift probe kept for `key`, None when none is (or it was measured for another
        model or setting, or the file predates the field: the probe then measures again)."""
        record = self._kept_drift()
        return record if record is not None and record.key == key else None

    def keep_drift(self, record: DriftRecord) -> None:
        """Keep a drift probe's result for later start-ups: written into the state file now
        when there is one, else with the first save (the one after registering)."""
        self._drift, self._drift_read = record, True
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # no state yet (or an unreadable one): the next save writes it
        if isinstance(data, dict) and data.get("format") == STATE_FORMAT:
            data["drift_probe"] = dataclasses.asdict(record)
            self._write_json(data)

    def _kept_drift(self) -> DriftRecord | None:
        """The record held, read from the state file the first time it is asked for."""
        if not self._drift_read:
            self._drift_read = True
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8")).get("drift_probe")
                self._drift = None if saved is None else DriftRecord.from_json(saved)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._drift = None  # no file, or a record it cannot read: measure again
        return self._drift

    def load_table(self, state: ClientState) -> CoefficientTable | None:
        """The saved table if it is the one the state names; None (catch up) otherwise."""
        if not state.alpha_sha256:
            return None
        try:
            raw = self.table_path.read_bytes()
        except OSError as exc:
            log.warning("no usable local alpha table (%s): catching up from the server",
                        exc.strerror)
            return None
        if hashlib.sha256(raw).hexdigest() != state.alpha_sha256:
            log.warning("%s does not match %s (interrupted save?): catching up from the server",
                        self.table_path.name, self.path.name)
            return None
        values = np.load(io.BytesIO(raw), allow_pickle=False)
        run = state.run
        columns = table_columns(run.num_blocks, run.hyper.readout_directions)
        if values.shape != (run.pool_size, columns):
            log.warning("the local alpha table is %s, the run's %d x %d: catching up",
                        values.shape, run.pool_size, columns)
            return None
        from zorba_edge.engine.coefficients import CoefficientTable

        return CoefficientTable(run.pool_size, columns, values, state.alpha_version)

    def save(self, state: ClientState, table: CoefficientTable | None = None) -> ClientState:
        """Write `state` (and `table`, when given); returns the state as written."""
        if table is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(table.values, dtype="<f8"), allow_pickle=False)
            raw = buffer.getvalue()
            try:
                atomic_write(self.table_path, raw)
            except OSError as exc:
                raise StateFileError(
                    f"{self.table_path}: cannot write the alpha table ({exc})") from None
            state = dataclasses.replace(state, alpha_version=table.version,
                                        alpha_sha256=hashlib.sha256(raw).hexdigest())
        payload: dict[str, Any] = {
            "format": STATE_FORMAT,
            "server_url": state.server_url,
            "client_id": state.client_id,
            "token": state.token,
            "run": dataclasses.asdict(state.run),
            "alpha_version": state.alpha_version,
            "alpha_sha256": state.alpha_sha256,
            "memory_floor": state.memory_floor,
        }
        drift = self._kept_drift()
        if drift is not None:
            payload["drift_probe"] = dataclasses.asdict(drift)
        self._write_json(payload)
        return state

    def _write_json(self, payload: dict[str, Any]) -> None:
        try:
            atomic_write(self.path, (json.dumps(payload, indent=2) + "\n").encode())
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot write the client state ({exc})") from None


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


def _floor(value: Any) -> float:
    floor = float(value)
    if not 0 < floor <= 1:
        raise ValueError(f"memory_floor must be in (0, 1], got {floor}")
    return floor
