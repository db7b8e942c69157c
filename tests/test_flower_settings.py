"""The Flower app's settings: dotted run-config keys become zorba-server's own config, and a
node's budget comes from its node config first (no flwr needed to test this)."""

from __future__ import annotations

import pytest

from zorba_flower.settings import client_app_settings, server_app_settings, server_config
from zorba_server.config import ConfigError

CLIENT = {"client.model": "m", "client.data": "d.jsonl", "client.budget-mib": 100.0}


def test_dotted_keys_become_the_servers_config_sections() -> None:
    config = server_config({"run.pool-size": 32, "run.max_rounds": 4, "aggregation.method": "median",
                            "flower.checkpoint": "x", "client.model": "m"})
    assert config.run.pool_size == 32 and config.run.max_rounds == 4
    assert config.aggregation.method == "median"


def test_an_unknown_server_key_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown key.*pool_sise"):
        server_config({"run.pool-sise": 32})


def test_the_server_app_needs_a_checkpoint_path() -> None:
    with pytest.raises(ConfigError, match="flower.checkpoint"):
        server_app_settings({"flower.rounds-log": ""})
    settings = server_app_settings({"flower.checkpoint": "/tmp/c", "flower.rounds-log": ""})
    assert settings.rounds_log is None


def test_a_nodes_budget_comes_from_its_node_config_then_its_partition_then_the_run() -> None:
    both = CLIENT | {"client.budgets-mib": "10,20"}
    assert client_app_settings(both, {"budget-mib": 7, "partition-id": 1}).budget_bytes == 7 * 2**20
    assert client_app_settings(both, {"partition-id": 1, "num-partitions": 2}).budget_bytes == 20 * 2**20
    assert client_app_settings(CLIENT | {"client.budgets-mib": ""}, {}).budget_bytes == 100 * 2**20


def test_a_missing_client_key_names_where_to_set_it() -> None:
    with pytest.raises(ConfigError, match="client.model"):
        client_app_settings({"client.data": "d", "client.budget-mib": 1.0}, {})
