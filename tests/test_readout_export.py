"""A run's label readout in its export: an untied head with the trained label rows, so the
exported model scores the labels as the trained model does."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_export import RUN_SEED, trained_table
from tiny_models import tiny_llama_config
from transformers import AutoModelForCausalLM

from zorba_common.errors import ModelSourceError
from zorba_edge.data.batches import ClassificationBatch
from zorba_edge.engine.coefficients import (
    AlphaIncrement,
    CoefficientTable,
    block_materializer,
    materialize_block_,
)
from zorba_edge.engine.losses import label_scores
from zorba_edge.model.export import export_checkpoint
from zorba_edge.model.gguf_export import export_gguf
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.readout import attach_readout
from zorba_edge.model.sources import RandomInitSource

TOKENS = (3, 7, 11)
BLOCKS = 2


def readout_table() -> CoefficientTable:
    """The body's trained table with the readout's column (R = 2) moved too."""
    body = trained_table(BLOCKS)
    table = CoefficientTable(body.pool_size, BLOCKS + 1)
    gen = torch.Generator().manual_seed(3)
    table.apply([AlphaIncrement(k, b, float(v)) for k, b, v in zip(*np.nonzero(body.values),
                                                                     body.values[np.nonzero(body.values)],
                                                                     strict=True)]
                + [AlphaIncrement(k, BLOCKS, float(torch.randn(1, generator=gen)) * 0.5)
                   for k in (1, 4, 30)])
    return table


def batch() -> ClassificationBatch:
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[:, -1] = 0  # room for the two-token label word
    return ClassificationBatch(ids, mask, torch.tensor([[7, 11], [3, -100]]), torch.tensor([0, 1, 0]))


def trained_scores(source: RandomInitSource, table: CoefficientTable) -> torch.Tensor:
    """The label scores of base + alpha with the readout's rows, as a client holds them."""
    model = load_model(source, (), LoadConfig(frozen_dtype="fp32"),
                       materialize=block_materializer(source.block_state_dict, table, RUN_SEED)).model
    readout, _ = attach_readout(model, TOKENS)
    materialize_block_(readout.tensors(), RUN_SEED, BLOCKS, table.column(BLOCKS))
    with torch.no_grad():
        return label_scores(model.eval(), batch())


@pytest.mark.parametrize("tied", [True, False])
def test_the_exported_model_scores_the_labels_as_the_trained_one(tmp_path: Path, tied: bool) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=BLOCKS, tie_word_embeddings=tied), seed=4)
    table = readout_table()
    out = export_checkpoint(source, table, RUN_SEED, tmp_path / "export", readout_tokens=TOKENS)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not reloaded.config.tie_word_embeddings
    head, embeddings = reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    assert head.data_ptr() != embeddings.data_ptr()
    with torch.no_grad():
        exported = label_scores(reloaded, batch())
    torch.testing.assert_close(exported, trained_scores(source, table), rtol=1e-5, atol=1e-5)
    # The embeddings and the head's other rows are the base model's.
    base = source.non_block_state_dict()
    base_head = base["model.embed_tokens.weight"] if tied else base["lm_head.weight"]
    torch.testing.assert_close(embeddings, base["model.embed_tokens.weight"], rtol=0, atol=0)
    others = [t for t in range(head.shape[0]) if t not in TOKENS]
    torch.testing.assert_close(head[others], base_head[others], rtol=0, atol=0)
    assert not torch.equal(head[list(TOKENS)], base_head[list(TOKENS)])


def test_a_moved_readout_needs_its_label_tokens_and_an_unmoved_one_exports_as_before(
        tmp_path: Path) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=BLOCKS, tie_word_embeddings=True), seed=4)
    with pytest.raises(ModelSourceError, match="label words"):
        export_checkpoint(source, readout_table(), RUN_SEED, tmp_path / "a")
    unmoved = CoefficientTable(32, BLOCKS + 1, np.pad(trained_table(BLOCKS).values, ((0, 0), (0, 1))))
    out = export_checkpoint(source, unmoved, RUN_SEED, tmp_path / "b")
    assert AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings


def test_the_gguf_export_carries_the_readout_as_its_output_tensor(tmp_path: Path) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=BLOCKS, tie_word_embeddings=True), seed=4)
    table = readout_table()
    out = export_gguf(source, table, RUN_SEED, tmp_path / "m.gguf", gguf_type="f16",
                      readout_tokens=TOKENS)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" in tensors  # untied: llama.cpp reads the head from it
    output = torch.from_numpy(np.array(tensors["output.weight"].data, dtype=np.float32))
    model = load_model(source, (), LoadConfig(frozen_dtype="fp32")).model
    readout, _ = attach_readout(model, TOKENS)
    materialize_block_(readout.tensors(), RUN_SEED, BLOCKS, table.column(BLOCKS))
    torch.testing.assert_close(output[list(TOKENS)], readout.rows.detach(), rtol=2.0 ** -10, atol=1e-6)
    embeddings = source.non_block_state_dict()["model.embed_tokens.weight"]
    others = [t for t in range(output.shape[0]) if t not in TOKENS]
    torch.testing.assert_close(output[others], embeddings[others], rtol=2.0 ** -10, atol=1e-6)
