"""A harness's flat settings (a command line's, a benchmark's) as the run config it holds.

The simulator, the quickstart and the benchmarks take RunConfig's fields as flat names beside
their own; this splits them, so that each harness holds the one run config and its defaults
(zorba_server/config.py) rather than a copy.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from zorba_server.config import AggregationConfig, RunConfig


def harness_run(values: typing.Mapping[str, Any], run: RunConfig,
                aggregation: AggregationConfig | None = None
                ) -> tuple[RunConfig, AggregationConfig, dict[str, Any]]:
    """A harness's flat map of names (its command line's, a benchmark's) as the run config it
    holds and its own fields: each RunConfig field replaces `run`'s, `aggregation` names the
    rule (aggregation.method), and the rest is returned for the harness's own dataclass."""
    aggregation = AggregationConfig() if aggregation is None else aggregation
    names = {f.name for f in dataclasses.fields(RunConfig)}
    own = {k: v for k, v in values.items() if k not in names and k != "aggregation"}
    run = dataclasses.replace(run, **{k: v for k, v in values.items() if k in names})
    if "aggregation" in values:
        aggregation = dataclasses.replace(aggregation, method=values["aggregation"])
    return run, aggregation, own
