"""Shared fixtures: tiny random causal LMs built in code (never downloaded).

The builders live in tests/tiny_models.py (importable as `tiny_models`); these fixtures hand
them out, and `tiny_model_dir` saves a model into the test's temporary directory.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, tiny_config, tiny_llama_config
from transformers import PretrainedConfig

# The benchmarks' own modules (benchmarks/results_page.py, quickstart_sim.py) import by name,
# as they do when a benchmark runs from that folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: a second intra-op thread only adds synchronisation, and on
    # a loaded 2-core machine (CI, or servers started by the tests) spinning threads made
    # a 300-step test take minutes instead of seconds.
    torch.set_num_threads(1)


@pytest.fixture
def tiny_config_factory() -> Callable[..., PretrainedConfig]:
    """`factory(family="llama", num_layers=2, hidden=64, vocab=128, **overrides)`."""
    return tiny_config


@pytest.fixture
def tiny_llama_config_factory() -> Callable[..., PretrainedConfig]:
    """`factory(num_layers=4, hidden=64, **overrides)`: a tiny LlamaConfig."""
    return tiny_llama_config


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """`factory(config=None, seed=0, name="model")`: save a random model, return its directory.

    Without a config it saves a 4-layer tiny Llama.
    """

    def make(config: PretrainedConfig | None = None, seed: int = 0, name: str = "model") -> Path:
        return save_tiny_model(config or tiny_llama_config(), tmp_path / name, seed=seed)

    return make


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built tokenizers are cached under ZORBA_EDGE_CACHE: never the user's own cache in tests."""
    monkeypatch.setenv("ZORBA_EDGE_CACHE", str(tmp_path_factory.mktemp("zorba-cache")))


@pytest.fixture(autouse=True)
def _no_leftover_log_handlers() -> Iterator[None]:
    """A command run in-process (`cli.main`) installs its log handler on the root logger, bound
    to that test's captured stderr, and sets zorba_edge's level: remove both afterwards, or a
    later test's log line goes to a closed stream ('--- Logging error ---' in its stderr)."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "zorba_edge", False)]:
        root.removeHandler(handler)
    logging.getLogger("zorba_edge").setLevel(logging.NOTSET)
