"""Embeddings and LM head held in a narrower dtype than the activations (LoadConfig.embed_dtype):
what they hold, that a tied head stays tied, that the logits stay fp32 and close, and that the
memory model (admission's one source of truth) counts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILY_NAMES, random_model, tiny_config
from torch import nn

from zorba_common.errors import DTypeError
from zorba_common.memory_model import (
    BYTES_PER_PARAM,
    HEAD_CAST_CHUNK_BYTES,
    MemorySettings,
    embed_head_bytes,
    linear_memory_model,
)
from zorba_edge.client.assembly import memory_profile
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.quantize import CastLinear
from zorba_edge.model.skeleton import build_skeleton, model_footprint
from zorba_edge.model.sources import open_source

VOCAB = 300


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """One saved 2-layer model per family, tied and untied."""
    root = tmp_path_factory.mktemp("embed_dtype")
    paths = {}
    for family in FAMILY_NAMES:
        for tied in (True, False):
            config = tiny_config(family, num_layers=2, vocab=VOCAB, tie_word_embeddings=tied)
            path = root / f"{family}-{tied}"
            random_model(config, seed=5).save_pretrained(path, safe_serialization=True)
            paths[family, tied] = path
    return paths


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_bf16_embeddings_give_fp32_logits_close_to_the_fp32_model(
    saved: dict[tuple[str, bool], Path], family: str, tied: bool
) -> None:
    source = open_source(saved[family, tied])
    full = load_model(source, [0], LoadConfig(frozen_dtype="fp32"))
    narrow = load_model(source, [0], LoadConfig(frozen_dtype="fp32", embed_dtype="bf16"))
    assert narrow.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert narrow.model.get_output_embeddings().weight.dtype == torch.bfloat16
    head_is_embedding = (narrow.model.get_output_embeddings().weight
                         is narrow.model.get_input_embeddings().weight)
    assert head_is_embedding == tied
    expected, got = _logits(full.model), _logits(narrow.model)
    assert got.dtype == torch.float32
    error = ((got - expected).norm() / expected.norm()).item()
    # bf16 rounds each weight by at most 2^-9 relative: the logits move by about that much,
    # and do move (the weights really are held narrower).
    assert 0 < error < 1e-2


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_narrow_embeddings_hold_the_bytes_the_memory_model_counts(
    saved: dict[tuple[str, bool], Path], tied: bool
) -> None:
    source = open_source(saved["llama", tied])
    footprint = model_footprint(build_skeleton(source.config))
    for dtype in ("fp32", "bf16", "fp16"):
        loaded = load_model(source, [], LoadConfig(frozen_dtype="fp32", embed_dtype=dtype))
        counted = footprint.embed_head_params * BYTES_PER_PARAM[dtype]
        # The final norm (hidden_size parameters) stays in the training dtype, fp32.
        norm_extra = footprint.hidden_size * (4 - BYTES_PER_PARAM[dtype])
        assert loaded.non_block_bytes() == counted + norm_extra


def test_tied_head_stays_tied_after_blocks_are_reassigned(saved: dict[tuple[str, bool], Path]) -> None:
    source = open_source(saved["gemma3", True])
    loaded = load_model(source, [0], LoadConfig(frozen_dtype="bf16", embed_dtype="bf16"))
    loaded.reassign([1], source.block_state_dict)
    head, embedding = loaded.model.get_output_embeddings(), loaded.model.get_input_embeddings()
    assert head.weight is embedding.weight and head.weight.dtype == torch.bfloat16


def test_default_embed_dtype_is_the_training_dtype(saved: dict[tuple[str, bool], Path]) -> None:
    source = open_source(saved["llama", True])
    loaded = load_model(source, [], LoadConfig(train_dtype="bf16", frozen_dtype="bf16"))
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert type(loaded.model.get_output_embeddings()) is nn.Linear  # nothing adapted
    assert LoadConfig().held_embed_dtype == "fp32"
    same = load_model(source, [], LoadConfig(frozen_dtype="bf16", embed_dtype="fp32"))
    assert type(same.model.get_output_embeddings()) is nn.Linear  # fp32 is the train dtype
    with pytest.raises(DTypeError, match="embed_dtype='nf4'"):
        LoadConfig(embed_dtype="nf4")


def test_chunked_cast_linear_keeps_the_activations_wide() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 48, generator=generator).to(torch.bfloat16)
    bias = torch.randn(1000, generator=generator)
    x = torch.randn(3, 5, 48, generator=generator)
    expected = F.linear(x, weight.float(), bias)
    for rows in (None, 1, 7, 999, 1000, 5000):
        out = CastLinear(weight, bias, chunk_rows=rows)(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    # Narrowing the activations instead (the plain bf16 head) would lose a 1e-3 change.
    delta = x * 1e-3
    head = CastLinear(weight, bias, chunk_rows=7)
    torch.testing.assert_close(head(x + delta) - head(x), F.linear(delta, weight.float()),
                               rtol=1e-3, atol=1e-5)


def test_a_bf16_embedding_admits_more_blocks_within_the_same_budget() -> None:
    # Gemma 3 270M's vocabulary over a small hidden size: the embedding dominates.
    footprint = model_footprint(build_skeleton(tiny_config("gemma3", num_layers=4, vocab=262144)))
    full = MemorySettings(train_dtype="fp32", frozen_dtype="bf16", embed_dtype="fp32")
    narrow = MemorySettings(train_dtype="fp32", frozen_dtype="bf16", embed_dtype="bf16")
    wide, small = linear_memory_model(footprint, full), linear_memory_model(footprint, narrow)
    saved = footprint.embed_head_params * 2 - HEAD_CAST_CHUNK_BYTES
    assert wide.fixed_bytes - small.fixed_bytes == saved
    budget = small.total(range(footprint.num_blocks))
    assert small.blocks_within(budget) == footprint.num_blocks
    assert wide.blocks_within(budget) < footprint.num_blocks
    # The client declares what it holds: the profile it registers carries embed_dtype.
    profile = memory_profile(LoadConfig(frozen_dtype="bf16", embed_dtype="bf16"), runtime_bytes=1)
    assert profile.settings(8, 64).embed_dtype == "bf16"


def test_a_small_head_is_widened_whole_and_counted_so() -> None:
    footprint = model_footprint(build_skeleton(tiny_config("llama", vocab=VOCAB)))
    narrow = MemorySettings(train_dtype="fp32", embed_dtype="bf16")
    head_fp32 = VOCAB * footprint.hidden_size * 4
    assert head_fp32 < HEAD_CAST_CHUNK_BYTES
    assert embed_head_bytes(footprint, narrow) == footprint.embed_head_params * 2 + head_fp32
