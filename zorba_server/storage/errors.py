"""What a store raises: domain errors, never a database driver's own exceptions.

Each keeps RuntimeError or ValueError as a base where the function API raised those before,
so callers written against it keep working.
"""

from __future__ import annotations

from zorba_common.errors import ZorbaError


class StoreError(ZorbaError):
    """Base of every error a store raises on purpose."""


class StoreUnavailableError(StoreError):
    """The database could not run or commit the write: nothing of it was saved; retry."""


class DuplicateError(StoreError):
    """A row that must be unique exists already: a second report of a client in a round, a
    reused idempotency key, or a client id or token hash registered before."""


class RoundNotOpenError(StoreError, RuntimeError):
    """A report for, or the closing of, a round that is not open (closed, or never opened)."""


class AlreadyPinnedError(StoreError, RuntimeError):
    """The run's model is fixed already; it is pinned once, by the first registration."""


class SchemaMismatchError(StoreError, RuntimeError):
    """The database was written by a server with another storage schema."""


class CorruptStoreError(StoreError):
    """The database holds what no server wrote (a NaN in the table, a table that differs from
    its increments, a missing table, an unreadable row or schema version) or is no database at
    all: it is refused, with one line naming it and what to do, before anything is written."""
