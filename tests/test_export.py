"""Export of base + alpha as a transformers checkpoint that from_pretrained loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama_config
from transformers import AutoModelForCausalLM

from zorba_common.errors import ModelSourceError
from zorba_edge.engine.coefficients import AlphaIncrement, CoefficientTable, block_materializer
from zorba_edge.model.export import export_checkpoint
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.sources import RandomInitSource

RUN_SEED = 17


def trained_table(num_blocks: int) -> CoefficientTable:
    table = CoefficientTable(pool_size=32, num_blocks=num_blocks)
    gen = torch.Generator().manual_seed(0)
    table.apply(
        AlphaIncrement(k, b, float(torch.randn(1, generator=gen)) * 1e-2)
        for k in (0, 3, 9, 31) for b in range(num_blocks)
    )
    return table


def test_export_then_reload_gives_the_same_logits(tmp_path: Path) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=3), seed=4)
    table = trained_table(3)
    seen: list[tuple[int, int]] = []
    out = export_checkpoint(source, table, RUN_SEED, tmp_path / "export",
                            progress=lambda done, total: seen.append((done, total)))

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = load_model(
        source, assignment=range(3), config=LoadConfig(frozen_dtype="fp32"),
        materialize=block_materializer(source.block_state_dict, table, RUN_SEED),
    ).model.eval()
    base = load_model(source, assignment=range(3), config=LoadConfig(frozen_dtype="fp32")).model.eval()

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exported_logits = reloaded(input_ids=ids).logits
        reference_logits = reference(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    assert torch.equal(exported_logits, reference_logits)
    assert not torch.allclose(exported_logits, base_logits, atol=1e-4)  # alpha really applied
    assert seen[-1] == (3, 3)


def test_export_refuses_a_non_empty_directory_and_a_mismatched_table(tmp_path: Path) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=2), seed=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep me")
    with pytest.raises(ModelSourceError, match="not empty"):
        export_checkpoint(source, trained_table(2), RUN_SEED, tmp_path / "busy")
    assert (tmp_path / "busy" / "file").read_text() == "keep me"
    with pytest.raises(ModelSourceError, match="table has 5 blocks but the model has 2"):
        export_checkpoint(source, trained_table(5), RUN_SEED, tmp_path / "new")
    assert not (tmp_path / "new").exists()
