"""The statements of the run's durable record, written once for SQLite and PostgreSQL.

Every function takes a connection (`sqlite3.Connection`, or `postgres.PgConnection`, which
speaks the same `execute(sql, params)` with `?` placeholders) and runs inside the caller's
transaction; the committer groups them (one commit, one fsync, for many reports). The
invariants a crash must not break are held by the schema and by doing related writes in one
transaction:

- a report row exists iff its 2xx was (or could have been) sent: acks wait for the commit;
- (client, idempotency key) is UNIQUE and (round, client) is the primary key: a report is
  stored once;
- closing a round writes its status, its increment row and the new alpha together, so
  alpha holds a round's increments iff that round's status is `applied`.

The tables are written once too (`schema`); the stores differ only in column types.
A table added later (`departures`, `safety`) is created IF NOT EXISTS when a store opens, so a database
of an older server gains it without a schema version change; a changed table needs a new
SCHEMA_VERSION and a migration step (`check_schema_version`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import msgpack
import numpy as np

from zorba_common.codec import decode, encode
from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import AlphaDelta, DeviceProfile, Report
from zorba_server.rounds import APPLIED, CHECKED, FAILED, OPEN, REJECTED, ReceivedReport, RoundPlan
from zorba_server.safety_state import SafetyState, tables_at
from zorba_server.storage import integrity
from zorba_server.storage.errors import (
    AlreadyPinnedError,
    CorruptStoreError,
    RoundNotOpenError,
    SchemaMismatchError,
)
from zorba_server.storage.store import ClientReports, ModelPin, Snapshot, StoredClient, StoredRound
from zorba_server.traffic import RoundBytes

SCHEMA_VERSION = 5
"""2: rounds may close as `rejected` (the loss guard); schema 1 refused that status.
3: a report's row holds the body bytes of the client's round it ended (`REPORT_BYTES`).
4: a client's row counts the rounds in which the loss guard found its check loss implausible
(`guard_outlier_rounds`: its quarantine outlives a restart).
5: rounds may close as `checked` (the final check, zorba_server/final_check.py); the `safety`
table (created when missing) holds what the safety rules remember (safety_state.py)."""
REPORT_BYTES = ("bytes_up", "bytes_down")
"""The reports table's columns of `RoundBytes` (NULL in rows stored before schema 3)."""
ROUND_STATUS_CHECK = ("CHECK (status IN ("
                      f"{', '.join(repr(s) for s in (OPEN, APPLIED, FAILED, REJECTED, CHECKED))}))")
"""The rounds table's status constraint, one text for both stores and their migrations."""
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL,
    seed {bigint} NOT NULL,
    pool_size INTEGER NOT NULL,
    created_at {real} NOT NULL,
    model_fingerprint TEXT,
    footprint {blob},
    version INTEGER NOT NULL DEFAULT 0,
    alpha {blob}
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    token_hash {blob} NOT NULL UNIQUE,
    profile {blob} NOT NULL,
    registered_at {real} NOT NULL,
    calibration {real} NOT NULL DEFAULT 1.0,
    guard_outlier_rounds INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    status TEXT NOT NULL {status_check},
    plan {blob} NOT NULL,
    closed_at {real},
    reports INTEGER NOT NULL DEFAULT 0,
    loss {real},
    message TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS reports (
    round INTEGER NOT NULL REFERENCES rounds (round),
    client_id TEXT NOT NULL REFERENCES clients (client_id),
    idempotency_key TEXT NOT NULL,
    body_hash {blob} NOT NULL,
    body {blob} NOT NULL,
    received_at {real} NOT NULL,
    bytes_up {bigint},
    bytes_down {bigint},
    PRIMARY KEY (round, client_id),
    UNIQUE (client_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS departures (
    client_id TEXT PRIMARY KEY REFERENCES clients (client_id),
    left_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS increments (
    version INTEGER PRIMARY KEY,
    round INTEGER NOT NULL UNIQUE REFERENCES rounds (round),
    delta {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS safety (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state {blob} NOT NULL
);
"""
"""The tables, with `{blob}`, `{real}` and `{bigint}` for the column types the stores name
in their own dialect."""


def schema(*, blob: str, real: str, bigint: str) -> str:
    """The CREATE TABLE statements in one dialect's column types."""
    return _TABLES.format(blob=blob, real=real, bigint=bigint, status_check=ROUND_STATUS_CHECK)


_UNLIMITED = 1 << 40  # our own rows: trusted, sized by the schema limits when written

T = TypeVar("T")
Op = Callable[[Any], Any]
"""One write or read, run by the committer inside a batch's transaction."""


class Connection(Protocol):
    """What the statements need of a database connection (sqlite3's own interface)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...


def check_schema_version(conn: Connection, where: str,
                         migrations: Mapping[int, Callable[[], None]]) -> None:
    """Stamp a new database with SCHEMA_VERSION; bring an older one up step by step, where
    `migrations[v]` turns schema v into v + 1 (each store knows its own DDL); refuse any other."""
    version = integrity.read_schema_version(conn, where)
    if version is None:
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return
    if version > SCHEMA_VERSION or any(v not in migrations for v in range(version, SCHEMA_VERSION)):
        raise SchemaMismatchError(
            f"{where} has storage schema {version}, this server writes {SCHEMA_VERSION}: "
            "use the server version that created it or start a new database"
        )
    for step in range(version, SCHEMA_VERSION):
        migrations[step]()
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(step + 1),))


def add_report_bytes(conn: Connection, integer_type: str) -> None:
    """Schema 2 -> 3: the reports table gains `REPORT_BYTES` (NULL for the rows it has: their
    bytes were never counted durably). Columns present already are left as they are."""
    present = {column[0] for column in conn.execute("SELECT * FROM reports LIMIT 0").description}
    for column in REPORT_BYTES:
        if column not in present:
            conn.execute(f"ALTER TABLE reports ADD COLUMN {column} {integer_type}")


def add_guard_outliers(conn: Connection) -> None:
    """Schema 3 -> 4: the clients table gains `guard_outlier_rounds` (0 for the clients it has:
    what the loss guard had counted lived in memory). A column present already is left."""
    present = {column[0] for column in conn.execute("SELECT * FROM clients LIMIT 0").description}
    if "guard_outlier_rounds" not in present:
        conn.execute("ALTER TABLE clients ADD COLUMN guard_outlier_rounds INTEGER NOT NULL DEFAULT 0")


def run_batch(conn: Connection, ops: Sequence[Op], begin: str = "BEGIN IMMEDIATE") -> list[Any]:
    """Run ops in one transaction, each in a savepoint: a failing op is rolled back alone.

    Returns one entry per op: its result, or the exception it raised. If the commit
    itself fails every entry becomes that exception (nothing of the batch is durable).
    """
    results = begin_batch(conn, ops, begin)
    failure = commit(conn)
    return results if failure is None else [failure] * len(ops)


def begin_batch(conn: Connection, ops: Sequence[Op], begin: str = "BEGIN IMMEDIATE") -> list[Any]:
    """First half of `run_batch`: the statements, in an open transaction (no fsync yet).

    `begin` opens it: SQLite's IMMEDIATE takes the write lock at once, PostgreSQL's plain BEGIN.
    """
    results: list[Any] = []
    try:
        conn.execute(begin)
        for op in ops:
            conn.execute("SAVEPOINT op")
            try:
                results.append(op(conn))
            except Exception as exc:  # handed to the op's caller, not swallowed
                conn.execute("ROLLBACK TO op")
                results.append(exc)
            conn.execute("RELEASE op")
    except Exception as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return [exc] * len(ops)
    return results


def commit(conn: Connection) -> Exception | None:
    """Second half: COMMIT (the fsync); the error if it failed, after rolling back."""
    if not conn.in_transaction:
        return None  # begin_batch failed and rolled back already
    try:
        conn.execute("COMMIT")
    except Exception as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return exc
    return None


# ---------------------------------------------------------------------------- loading


def load(conn: Connection, *, recent_deltas: int) -> Snapshot:
    """Everything a restarted server needs; a row that cannot be read is a CorruptStoreError
    (one line), not a traceback."""
    try:
        return _load(conn, recent_deltas)
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptStoreError(
            f"the database is damaged: a stored row cannot be read ({type(exc).__name__}: {exc}); "
            f"{integrity.WHAT_TO_DO}") from None


def _load(conn: Connection, recent_deltas: int) -> Snapshot:
    row = conn.execute(
        "SELECT run_id, seed, pool_size, created_at, model_fingerprint, footprint, version, alpha"
        " FROM run WHERE id = 1"
    ).fetchone()
    if row is None:
        return Snapshot(None, 0, 0, 0.0, None, None, 0, None, [], [], [], [])
    run_id, seed, pool_size, created_at, fingerprint, footprint_blob, version, alpha_blob = row
    footprint = _unpack_footprint(footprint_blob) if footprint_blob is not None else None
    alpha = None
    if alpha_blob is not None and footprint is not None:
        alpha = np.frombuffer(alpha_blob, dtype="<f8").copy()
        # K x B, or K x (B + 1) with the label readout's column (zorba_common.readout).
        alpha = alpha.reshape(pool_size, alpha.size // pool_size)
    clients = [
        StoredClient(cid, bytes(th), decode(DeviceProfile, prof, max_bytes=_UNLIMITED), at, cal,
                     left, int(outliers))
        for cid, th, prof, at, cal, left, outliers in conn.execute(
            "SELECT c.client_id, token_hash, profile, registered_at, calibration, d.left_at,"
            " guard_outlier_rounds"
            " FROM clients c LEFT JOIN departures d ON d.client_id = c.client_id"
            " ORDER BY registered_at, c.client_id"
        )
    ]
    rounds = [
        StoredRound(RoundPlan.from_record(msgpack.unpackb(plan, strict_map_key=False)), status,
                    closed_at, reports, loss, message)
        for plan, status, closed_at, reports, loss, message in conn.execute(
            "SELECT plan, status, closed_at, reports, loss, message FROM rounds ORDER BY round"
        )
    ]
    open_reports: list[ReceivedReport] = []
    if rounds and rounds[-1].status == OPEN:
        open_reports = [
            ReceivedReport(cid, decode(Report, body, max_bytes=_UNLIMITED), bytes(h), at)
            for cid, body, h, at in conn.execute(
                "SELECT client_id, body, body_hash, received_at FROM reports WHERE round = ?"
                " ORDER BY client_id",
                (rounds[-1].plan.round,),
            )
        ]
    deltas = [
        decode(AlphaDelta, blob, max_bytes=_UNLIMITED)
        for (blob,) in conn.execute(
            "SELECT delta FROM (SELECT version, delta FROM increments ORDER BY version DESC"
            " LIMIT ?) AS recent ORDER BY version",
            (recent_deltas,),
        )
    ]
    counts = dict(conn.execute("SELECT client_id, COUNT(*) FROM reports GROUP BY client_id"))
    client_reports = {}
    for cid, body, up, down in conn.execute(
            "SELECT r.client_id, r.body, r.bytes_up, r.bytes_down FROM reports r JOIN (SELECT"
            " client_id, MAX(round) AS last FROM reports GROUP BY client_id) l"
            " ON r.client_id = l.client_id AND r.round = l.last"):
        last = decode(Report, body, max_bytes=_UNLIMITED)
        traffic = None if up is None or down is None else RoundBytes(int(up), int(down))
        client_reports[cid] = ClientReports(int(counts[cid]), last.loss_mean,
                                            last.peak_memory_bytes, traffic)
    return Snapshot(run_id, seed, pool_size, created_at, fingerprint, footprint, version, alpha,
                    clients, rounds, open_reports, deltas, client_reports,
                    _load_safety(conn, alpha))


def _load_safety(conn: Connection, alpha: np.ndarray | None) -> SafetyState | None:
    """The stored safety state, its tables replayed from the increments (safety_state.py)."""
    row = conn.execute("SELECT state FROM safety WHERE id = 1").fetchone()
    if row is None or alpha is None:
        return None
    record = msgpack.unpackb(bytes(row[0]), strict_map_key=False)
    last = max(record["tables"], default=0)
    deltas = (decode(AlphaDelta, bytes(blob), max_bytes=_UNLIMITED) for (blob,) in conn.execute(
        "SELECT delta FROM increments WHERE version <= ? ORDER BY version", (last,)))
    return SafetyState.from_record(record, tables_at(deltas, alpha.shape, record["tables"]))


def read_reports(conn: Connection) -> list[tuple[int, ReceivedReport]]:
    return [
        (round_, ReceivedReport(cid, decode(Report, body, max_bytes=_UNLIMITED), bytes(h), at))
        for round_, cid, body, h, at in conn.execute(
            "SELECT round, client_id, body, body_hash, received_at FROM reports"
            " ORDER BY round, client_id")
    ]


def _unpack_footprint(blob: bytes) -> ModelFootprint:
    rec = msgpack.unpackb(blob)
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in rec.items()}
    return ModelFootprint(**fields)


def _pack_footprint(footprint: ModelFootprint) -> bytes:
    return encode(footprint)


# ---------------------------------------------------------------------------- writes


def create_run(conn: Connection, run_id: str, seed: int, pool_size: int,
               created_at: float) -> None:
    conn.execute(
        "INSERT INTO run (id, run_id, seed, pool_size, created_at) VALUES (1, ?, ?, ?, ?)",
        (run_id, seed, pool_size, created_at),
    )


def pin_model(conn: Connection, fingerprint: str, footprint: ModelFootprint,
              alpha: np.ndarray) -> None:
    """Fix the run's model; alpha starts as zeros of K x B."""
    updated = conn.execute(
        "UPDATE run SET model_fingerprint = ?, footprint = ?, alpha = ? WHERE id = 1"
        " AND model_fingerprint IS NULL",
        (fingerprint, _pack_footprint(footprint), _alpha_blob(alpha)),
    ).rowcount
    if updated != 1:
        raise AlreadyPinnedError("the run's model is already pinned")


def insert_client(conn: Connection, client_id: str, token_hash: bytes,
                  profile: DeviceProfile, registered_at: float, pin: ModelPin | None = None) -> None:
    """Store a client; with `pin`, the first client fixes the run's model in the same
    transaction (a pinned model never exists without the client that pinned it)."""
    if pin is not None:
        pin_model(conn, pin.fingerprint, pin.footprint, pin.alpha)
    conn.execute(
        "INSERT INTO clients (client_id, token_hash, profile, registered_at) VALUES (?, ?, ?, ?)",
        (client_id, token_hash, encode(profile), registered_at),
    )


def set_left(conn: Connection, client_id: str, left_at: float | None) -> None:
    conn.execute("DELETE FROM departures WHERE client_id = ?", (client_id,))
    if left_at is not None:
        conn.execute("INSERT INTO departures (client_id, left_at) VALUES (?, ?)",
                     (client_id, left_at))


def insert_round(conn: Connection, plan: RoundPlan) -> None:
    conn.execute(
        "INSERT INTO rounds (round, status, plan) VALUES (?, 'open', ?)",
        (plan.round, msgpack.packb(plan.to_record())),
    )


def insert_report(conn: Connection, round_: int, received: ReceivedReport,
                  traffic: RoundBytes | None = None) -> None:
    status = conn.execute("SELECT status FROM rounds WHERE round = ?", (round_,)).fetchone()
    if status is None or status[0] != OPEN:
        # The coordinator never closes a round with commits pending; this guards the invariant.
        raise RoundNotOpenError(f"round {round_} is not open")
    conn.execute(
        "INSERT INTO reports (round, client_id, idempotency_key, body_hash, body, received_at,"
        f" {', '.join(REPORT_BYTES)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (round_, received.client_id, received.report.idempotency_key, received.body_hash,
         received.canonical(), received.received_at,
         None if traffic is None else traffic.up, None if traffic is None else traffic.down),
    )


def find_report(conn: Connection, client_id: str,
                idempotency_key: str) -> tuple[int, bytes, float] | None:
    """(round, body hash, received_at) of a stored report, for idempotent retries."""
    row = conn.execute(
        "SELECT round, body_hash, received_at FROM reports"
        " WHERE client_id = ? AND idempotency_key = ?",
        (client_id, idempotency_key),
    ).fetchone()
    return None if row is None else (row[0], bytes(row[1]), row[2])


def close_round(conn: Connection, round_: int, status: str, closed_at: float, reports: int,
                loss: float | None, message: str, *, delta: AlphaDelta | None = None,
                alpha: np.ndarray | None = None,
                calibrations: dict[str, float] | None = None,
                guard_outliers: Sequence[str] = (), safety: SafetyState | None = None) -> None:
    """Close a round; with a delta (an applied round's, or a rejected round's rollback), the
    increment and the new alpha in the same transaction, as are the clients' calibrations,
    one more outlier round for each client the loss guard left out of the verdict, and what
    the safety rules remember after it."""
    if status not in (APPLIED, FAILED, REJECTED, CHECKED):
        raise ValueError(f"a round closes as applied, rejected, checked or failed, not {status!r}")
    updated = conn.execute(
        "UPDATE rounds SET status = ?, closed_at = ?, reports = ?, loss = ?, message = ?"
        " WHERE round = ? AND status = 'open'",
        (status, closed_at, reports, loss, message, round_),
    ).rowcount
    if updated != 1:
        raise RoundNotOpenError(f"round {round_} is not open: it cannot be closed twice")
    if status == APPLIED and (delta is None or alpha is None):
        raise ValueError("an applied round needs its delta and the new alpha")
    if delta is not None:  # applied, or rejected with the loss guard's rollback
        if alpha is None:
            raise ValueError("a round that publishes a delta needs the new alpha")
        conn.execute("INSERT INTO increments (version, round, delta) VALUES (?, ?, ?)",
                     (delta.version, round_, encode(delta)))
        conn.execute("UPDATE run SET version = ?, alpha = ? WHERE id = 1",
                     (delta.version, _alpha_blob(alpha)))
    for client_id, calibration in (calibrations or {}).items():
        conn.execute("UPDATE clients SET calibration = ? WHERE client_id = ?",
                     (calibration, client_id))
    for client_id in guard_outliers:
        conn.execute("UPDATE clients SET guard_outlier_rounds = guard_outlier_rounds + 1"
                     " WHERE client_id = ?", (client_id,))
    if safety is not None:
        conn.execute("INSERT INTO safety (id, state) VALUES (1, ?)"
                     " ON CONFLICT (id) DO UPDATE SET state = excluded.state",
                     (msgpack.packb(safety.to_record()),))


def _alpha_blob(alpha: np.ndarray) -> bytes:
    return np.ascontiguousarray(alpha, dtype="<f8").tobytes()
