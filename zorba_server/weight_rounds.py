"""fedavg's weight exchange around the rounds: uploads before reports, one averaged file per
applied version; the files are `WeightStore`'s. Every other mode exchanges no weights
(`NoWeights`), so the coordinator calls the same hooks in every mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from pathlib import Path

from zorba_common.limits import MAX_WEIGHTS_BYTES
from zorba_server import errors
from zorba_server.config import ConfigError, ServerConfig
from zorba_server.engine import OpenRound, RoundClosure, RoundEngine, round_closed
from zorba_server.storage import is_postgres_url
from zorba_server.weight_store import Upload, WeightStore


def weight_rounds(config: ServerConfig, engine: RoundEngine) -> WeightRounds | NoWeights:
    """The run mode's weight exchange."""
    return WeightRounds(config, engine) if engine.weights_only else NoWeights(config.run.mode)


class WeightRounds:
    def __init__(self, config: ServerConfig, engine: RoundEngine) -> None:
        if is_postgres_url(config.storage.path):
            raise ConfigError(
                "run.mode='fedavg' keeps its weight files beside a SQLite database "
                "(<storage.path>.weights/): give storage.path a file, not a PostgreSQL URL")
        self.files = WeightStore(config.storage.path, keep_versions=config.run.keep_weight_versions,
                                 max_upload_bytes=MAX_WEIGHTS_BYTES)
        self._engine = engine

    def check_uploaded(self, round_: int, client_id: str) -> None:
        """A report needs its weights first."""
        if not self.files.has_upload(round_, client_id):
            raise errors.conflict(
                "weights_missing", f"round {round_} is a fedavg round: PUT the trained weights to "
                f"/v1/rounds/{round_}/weights before reporting")

    async def receive(self, r: OpenRound | None, round_: int, client_id: str, *, busy: bool,
                      reported: bool, now: float, chunks: AsyncIterable[bytes]) -> int:
        """A client's trained weights for the open round `r` (`busy`: it is closing)."""
        if r is None or r.plan.round != round_ or busy or now >= self._engine.closes_at(r.plan):
            raise round_closed(round_)
        if client_id not in r.plan.clients:
            raise errors.conflict("not_assigned",
                                  f"client {client_id} has no assignment in round {round_}")
        if reported:
            raise errors.conflict("already_reported",
                                  f"client {client_id} already reported for round {round_}")
        assert self._engine.footprint is not None
        return await self.files.receive(round_, client_id, chunks, self._engine.footprint)

    def current(self) -> tuple[Path, int]:
        """The current global weights and their version (404 at version 0)."""
        version = self._engine.version
        path = self.files.version_file(version)
        if path is None:
            raise errors.not_found(
                "no_weights", f"alpha version {version} has no averaged weights: version 0 "
                "is the base model, which every client loads itself")
        return path, version

    async def average(self, closure: RoundClosure) -> None:
        """Before the close commits: a version never exists without its weights."""
        if closure.delta is None:
            return
        weights = self._engine.sample_weights(closure.client_ids)
        uploads = [Upload(cid, self.files.upload_path(closure.plan.round, cid), weights[cid])
                   for cid in closure.client_ids]
        await asyncio.to_thread(self.files.average, uploads, closure.delta.version)

    def closed(self, closure: RoundClosure) -> None:
        self.files.discard_round(closure.plan.round)
        self.files.prune_versions(self._engine.version)


class NoWeights:
    """A mode whose training travels as (k, g) steps: no uploads, nothing to average; the
    weight endpoints say so."""

    def __init__(self, mode: str) -> None:
        self._mode = mode

    def check_uploaded(self, round_: int, client_id: str) -> None:
        pass

    async def receive(self, r: OpenRound | None, round_: int, client_id: str, *, busy: bool,
                      reported: bool, now: float, chunks: AsyncIterable[bytes]) -> int:
        raise not_fedavg(self._mode)

    def current(self) -> tuple[Path, int]:
        raise not_fedavg(self._mode)

    async def average(self, closure: RoundClosure) -> None:
        pass

    def closed(self, closure: RoundClosure) -> None:
        pass


def not_fedavg(mode: str) -> errors.Refusal:
    return errors.not_found("not_fedavg", f"this run's mode is {mode!r}: weights are exchanged "
                            "only in the fedavg baseline")
