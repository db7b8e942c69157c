"""A store that checks itself: what a database must hold before a server serves from it.

SQLite's own `integrity_check` sees the pages, not the numbers: 64 bytes flipped on every 4th
page of a copy passed it, the server resumed, and `/v1/state` handed 16 NaN cells to every
client; a 0-byte file silently started a new run, `schema_version = 'abc'` ended in a
traceback, and a dropped `increments` table was recreated empty (issue 27). The checks here
run on open, before any write, for SQLite and PostgreSQL alike (over `sql.Connection`):

- the tables an existing run database has are all there (`check_tables`);
- its schema version is an integer (`read_schema_version`);
- the coefficient table is finite, of the run's shape, and equal, bit for bit, to the sum of
  its stored increments replayed in version order from zeros (the server applies them in
  exactly that way: `aggregation.apply_delta`), whose versions run 1, 2, ... up to the run's
  (`check_alpha`). A damaged cell of the table or of an increment breaks the equality.

Every refusal is one `CorruptStoreError` line: the database, what is wrong, what to do.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from zorba_common.codec import decode
from zorba_common.messages import AlphaDelta
from zorba_server.storage.errors import CorruptStoreError

REQUIRED_TABLES = ("meta", "run", "clients", "rounds", "reports", "increments")
"""Every run database has these (`departures`, added later, is created when missing)."""
_UNLIMITED = 1 << 40
WHAT_TO_DO = ("nothing was served or written: restore a copy made with `zorba-server backup`, "
              "or start a new run with another --db")


def refuse(where: str, what: str) -> CorruptStoreError:
    return CorruptStoreError(f"{where} is damaged: {what}; {WHAT_TO_DO}")


def check_tables(where: str, present: Collection[str]) -> None:
    """A database with none of the run's tables is new; one with some but not all is damaged
    (creating the missing ones empty would serve a run without its history)."""
    found = [t for t in REQUIRED_TABLES if t in present]
    missing = [t for t in REQUIRED_TABLES if t not in present]
    if found and missing:
        raise refuse(where, f"the table(s) {', '.join(missing)} are missing")


def read_schema_version(conn: Any, where: str) -> int | None:
    """The stored schema version (None: not stamped yet), or a refusal when it is no integer."""
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        return None
    text = str(row[0])
    if not (text.isascii() and text.isdigit()):
        raise refuse(where, f"its schema version {text[:40]!r} is not an integer")
    return int(text)


@dataclass(frozen=True)
class Checked:
    """What a sound database holds (for `zorba-server check`)."""

    run_id: str | None
    version: int
    increments: int
    rounds: int


def check_alpha(conn: Any, where: str) -> Checked:
    """The coefficient table is finite and is the sum of its increments; the increments
    are readable, finite and numbered 1..version."""
    rounds = int(conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    row = conn.execute("SELECT run_id, pool_size, footprint, version, alpha FROM run WHERE id = 1"
                       ).fetchone()
    count = int(conn.execute("SELECT COUNT(*) FROM increments").fetchone()[0])
    if row is None:
        if count or rounds:
            raise refuse(where, f"it holds {rounds} rounds and {count} increments but no run")
        return Checked(None, 0, 0, 0)
    run_id, pool_size, footprint_blob, version, alpha_blob = row
    if alpha_blob is None or footprint_blob is None:
        if count or version:
            raise refuse(where, f"the run is at version {version} with {count} increments but "
                                "has no coefficient table")
        return Checked(run_id, 0, 0, rounds)
    try:
        num_blocks = len(msgpack.unpackb(bytes(footprint_blob))["block_params"])
    except Exception as exc:  # any damage of the blob: the message says which row
        raise refuse(where, f"the run's model footprint cannot be read ({exc})") from None
    alpha = np.frombuffer(bytes(alpha_blob), dtype="<f8")
    # The model's blocks, and the label readout's column when the run has one
    # (zorba_common.readout).
    if alpha.size not in (pool_size * num_blocks, pool_size * (num_blocks + 1)):
        raise refuse(where, f"the coefficient table has {alpha.size} cells, the run's "
                            f"{pool_size} x {num_blocks} needs {pool_size * num_blocks} (with "
                            f"the label readout's column {pool_size * (num_blocks + 1)})")
    num_blocks = alpha.size // pool_size
    alpha = alpha.reshape(pool_size, num_blocks)
    bad = int(np.count_nonzero(~np.isfinite(alpha)))
    if bad:
        raise refuse(where, f"the coefficient table holds {bad} NaN or infinite cells")
    replay = np.zeros_like(alpha)
    expected = 1
    for stored_version, blob in conn.execute("SELECT version, delta FROM increments ORDER BY version"):
        if stored_version != expected:
            raise refuse(where, f"increment {expected} is missing (the next is {stored_version})")
        try:
            delta = decode(AlphaDelta, bytes(blob), max_bytes=_UNLIMITED)
            values = np.concatenate([delta.matrix().ravel(), delta.readout_matrix()])
            top_k, top_block = delta.max_index()
        except Exception as exc:  # a damaged blob: the message says which
            raise refuse(where, f"increment {stored_version} cannot be read ({exc})") from None
        if not np.all(np.isfinite(values)) or top_k >= pool_size or top_block >= num_blocks:
            raise refuse(where, f"increment {stored_version} holds NaN, infinite or out-of-range "
                                "cells")
        delta.add_to_(replay)
        expected += 1
    if expected - 1 != version:
        raise refuse(where, f"the run is at version {version} but {expected - 1} increments are "
                            "stored")
    differ = int(np.count_nonzero(replay != alpha))
    if differ:
        raise refuse(where, f"{differ} cells of the coefficient table differ from the sum of its "
                            f"{count} stored increments")
    return Checked(run_id, int(version), count, rounds)
