"""Export of base + alpha as GGUF: the file loads with the gguf reader, its tensors (read back
through transformers' GGUF tables, which undo llama.cpp's q/k layout) are base + alpha within
the storage type's rounding, and a GGUF base model's tokenizer and settings travel along."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from test_export import RUN_SEED, trained_table
from tiny_models import random_model, tiny_config, tiny_llama_config, tiny_spm_vocab, write_tiny_llama_gguf

from zorba_common.errors import ModelSourceError, UnsupportedArchitectureError
from zorba_edge.engine.coefficients import block_materializer
from zorba_edge.model.gguf_export import export_gguf, metadata_of
from zorba_edge.model.sources import GGUFSource, RandomInitSource

F16_RELATIVE = 2.0 ** -11  # half of float16's 10-bit mantissa step
F16_SMALLEST = 2.0 ** -24  # float16's subnormal step


def _max_error(exported: GGUFSource, source: RandomInitSource,
               num_blocks: int) -> list[tuple[str, float, float]]:
    """(tensor, max |exported - expected|, max |expected|) for every block tensor."""
    materialize = block_materializer(source.block_state_dict, trained_table(num_blocks), RUN_SEED)
    rows = []
    for block in range(num_blocks):
        expected, got = materialize(block), exported.block_state_dict(block)
        assert got.keys() == expected.keys()
        for name, want in expected.items():
            rows.append((f"{block}.{name}", float((got[name] - want).abs().max()), float(want.abs().max())))
    return rows


def test_f16_export_is_base_plus_alpha_within_half_precision(tmp_path: Path) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=3), seed=4)
    seen: list[tuple[int, int]] = []
    out = export_gguf(source, trained_table(3), RUN_SEED, tmp_path / "model-f16.gguf", gguf_type="f16",
                      progress=lambda done, total: seen.append((done, total)))

    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert metadata_of(out)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert seen[-1] == (3, 3)

    for name, error, scale in _max_error(GGUFSource(out), source, 3):
        assert error <= scale * F16_RELATIVE + F16_SMALLEST, name


def test_q8_0_export_is_base_plus_alpha_within_a_q8_0_step(tmp_path: Path) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=2), seed=1)
    out = export_gguf(source, trained_table(2), RUN_SEED, tmp_path / "model-q8.gguf", gguf_type="q8_0")

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    rows = _max_error(GGUFSource(out), source, 2)
    for name, error, scale in rows:
        # Q8_0: 32 values share an f16 scale amax/127; rounding to it errs by half a step
        # (plus the scale's own f16 rounding, times 127).
        assert error <= scale / 127 * (0.5 + 127 * F16_RELATIVE) + 1e-7, name
    assert max(e for _, e, _ in rows) > 0  # really quantised, not stored exactly


def test_a_gguf_base_gives_its_tokenizer_and_settings_to_the_export(tmp_path: Path) -> None:
    vocab = tiny_spm_vocab()
    config = tiny_llama_config(num_layers=2, vocab=len(vocab[0]))
    base = write_tiny_llama_gguf(random_model(config, seed=3), tmp_path / "base.gguf", vocab=vocab)
    source = GGUFSource(base)
    out = export_gguf(source, trained_table(2), RUN_SEED, tmp_path / "tuned.gguf", gguf_type="q8_0",
                      name="tiny-llama zorba")

    exported = gguf.GGUFReader(out)
    original = gguf.GGUFReader(base)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "llama.rope.freq_base"):
        assert exported.fields[key].contents() == original.fields[key].contents(), key
    assert exported.fields["general.name"].contents() == "tiny-llama zorba"
    reopened = GGUFSource(out)
    assert reopened.tokenizer().encode("great movie") == source.tokenizer().encode("great movie")
    tuned = block_materializer(source.block_state_dict, trained_table(2), RUN_SEED)(1)
    got = reopened.block_state_dict(1)
    scale = max(float(t.abs().max()) for t in tuned.values())
    assert max(float((got[n] - t).abs().max()) for n, t in tuned.items()) <= scale / 127


def test_gguf_export_refuses_an_existing_file_an_unknown_type_and_an_unsupported_family(
        tmp_path: Path) -> None:
    source = RandomInitSource(tiny_llama_config(num_layers=2), seed=0)
    (tmp_path / "taken.gguf").write_text("keep me")
    with pytest.raises(ModelSourceError, match="exists"):
        export_gguf(source, trained_table(2), RUN_SEED, tmp_path / "taken.gguf")
    with pytest.raises(ModelSourceError, match="q4_k"):
        export_gguf(source, trained_table(2), RUN_SEED, tmp_path / "a.gguf", gguf_type="q4_k")
    with pytest.raises(ModelSourceError, match="3 blocks"):
        export_gguf(source, trained_table(3), RUN_SEED, tmp_path / "b.gguf")
    gemma = RandomInitSource(tiny_config("gemma3", num_layers=2), seed=0)
    with pytest.raises(UnsupportedArchitectureError, match="convert_hf_to_gguf"):
        export_gguf(gemma, trained_table(2), RUN_SEED, tmp_path / "c.gguf")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "c.gguf").exists()

