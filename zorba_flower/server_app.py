"""The Flower ServerApp: builds the round engine from the run config and runs the loop.

Run it again with the same `flower.checkpoint` after a SuperLink restart (which fails the
Flower run) and it resumes from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from zorba_flower import checkpoint
from zorba_flower.server_loop import FlowerRounds, LoopSettings, RoundLog, log
from zorba_flower.settings import server_app_settings, server_config
from zorba_server.engine import RoundEngine


def make_server_app(overrides: Mapping[str, Any] | None = None,
                    on_done: Callable[[FlowerRounds], None] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's with `overrides` on top; `on_done` sees the
    finished loop (in-process runs read their figures from it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        values = {**context.run_config, **(overrides or {})}
        config = server_config(values)
        settings = server_app_settings(values)
        engine = RoundEngine(config)
        # A resumed run keeps its first run id: it names the table the clients sync to.
        run_id = checkpoint.run_id_of(settings.checkpoint) or f"flower-{grid.run.run_id}"
        rounds = FlowerRounds(engine, LoopSettings(settings.checkpoint, run_id,
                                                   query_timeout_s=settings.query_timeout_s,
                                                   max_idle_s=settings.max_idle_s),
                              on_round=round_logger(settings.rounds_log))
        try:
            rounds.run(grid)
        finally:
            if on_done is not None:
                on_done(rounds)
        log.info("run %s finished at alpha version %d", run_id, engine.version)

    return app


def round_logger(path: Path | None) -> Callable[[RoundLog], None] | None:
    if path is None:
        return None

    def write(entry: RoundLog) -> None:
        row = {"round": entry.round, "status": entry.status, "wall_s": entry.wall_s,
               "overhead_s": entry.overhead_s, "version": entry.version, "loss": entry.loss,
               "assigned": {str(n): list(b) for n, b in entry.assigned.items()},
               "reported": list(entry.reported), "dropped": list(entry.dropped),
               "timings": [dataclasses.asdict(t) for t in entry.timings]}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    return write


app = make_server_app()
