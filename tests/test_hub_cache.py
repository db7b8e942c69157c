"""`--model ORG/NAME` opens a model from the local Hugging Face cache and never downloads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from client_support import TinyWorld, make_world

from zorba_common.errors import ModelSourceError
from zorba_edge.model.hub_cache import cached_model_path, looks_like_model_id
from zorba_edge.model.sources import SafetensorsDirSource, open_source


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return make_world(tmp_path_factory.mktemp("world"))


def _cache(root: Path, model_id: str, files: Path | None) -> Path:
    """The hub cache layout: models--ORG--NAME/refs/main naming snapshots/<commit>/."""
    repo = root / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    if files is not None:
        shutil.copytree(files, snapshot)
    else:
        snapshot.mkdir(parents=True)
    return snapshot


def test_a_cached_model_id_opens_the_snapshot(world: TinyWorld, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = _cache(tmp_path, "lab/tiny-llama", world.model_dir)
    assert cached_model_path("lab/tiny-llama", cache_dir=tmp_path) == snapshot
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    source = open_source("lab/tiny-llama")
    assert isinstance(source, SafetensorsDirSource)
    assert source.fingerprint == open_source(world.model_dir).fingerprint


def test_a_model_id_not_in_the_cache_is_named_with_the_command_that_fetches_it(
        tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"not in the local Hugging Face cache .*hf download lab/ab"):
        cached_model_path("lab/absent", cache_dir=tmp_path)
    _cache(tmp_path, "lab/no-weights", None)
    with pytest.raises(ModelSourceError, match="neither a config.json nor a .gguf"):
        cached_model_path("lab/no-weights", cache_dir=tmp_path)


def test_only_ids_are_looked_up() -> None:
    assert looks_like_model_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for path in ("./models/x", "/abs/x", "~/x/y", "model.gguf", "a/b/c", "dir/model.gguf"):
        assert not looks_like_model_id(path), path
