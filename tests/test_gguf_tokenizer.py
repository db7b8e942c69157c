"""A GGUF's tokenizer is built from, and checked against, the file's own vocabulary."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from tiny_models import SPIECE_WORDS, random_model, tiny_config, tiny_spm_vocab, write_tiny_llama_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from zorba_common.errors import ModelSourceError
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.export import export_checkpoint
from zorba_edge.model.gguf_tokenizer import (
    build_sentencepiece_bpe,
    check_tokenizer,
    read_gguf_vocab,
    require_tokenizer_matches,
)
from zorba_edge.model.sources import GGUFSource, open_source


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    vocab = tiny_spm_vocab()
    model = random_model(tiny_config("llama", vocab=len(vocab[0])), seed=3)
    return write_tiny_llama_gguf(model, tmp_path / "tiny.gguf", vocab=vocab)


def _char_level(path: Path) -> PreTrainedTokenizerFast:
    """A deliberately broken tokenizer: the right pieces, but no merges (near-character)."""
    from tokenizers import Tokenizer, models, normalizers

    vocab = read_gguf_vocab(path)
    tokenizer = Tokenizer(models.BPE({p: i for i, p in enumerate(vocab.tokens)}, [],
                                     unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_the_built_tokenizer_keeps_the_vocabularys_whole_words_whole(tiny_gguf: Path) -> None:
    vocab = read_gguf_vocab(tiny_gguf)
    assert vocab.model == "llama" and not vocab.add_space_prefix
    tokenizer = build_sentencepiece_bpe(vocab)
    great = tokenizer.encode(" great", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(great) == ["▁great"]
    # No prefix space: a text's first word is the bare piece, as the GGUF says.
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("great", add_special_tokens=False)) == [
        "great"]
    assert tokenizer.encode("great")[0] == vocab.bos_id
    words = vocab.whole_words()
    assert len(words) >= 2 * len(SPIECE_WORDS)
    result = check_tokenizer(tokenizer, words)
    assert result.ok and result.whole == result.checked
    require_tokenizer_matches(tokenizer, vocab, "tiny")


def test_the_check_refuses_a_broken_tokenizer_and_names_the_way_out(tiny_gguf: Path) -> None:
    vocab = read_gguf_vocab(tiny_gguf)
    broken = _char_level(tiny_gguf)
    assert len(broken.encode(" great", add_special_tokens=False)) > 1
    result = check_tokenizer(broken, vocab.whole_words())
    assert not result.ok and result.broken
    with pytest.raises(ModelSourceError, match="--tokenizer DIR") as error:
        require_tokenizer_matches(broken, vocab, "tiny")
    assert "60 of 60 sampled" in str(error.value) and "-> [" in str(error.value)


def test_a_gguf_source_gives_the_checked_tokenizer_and_caches_it(
        tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZORBA_EDGE_CACHE", str(tmp_path / "cache"))
    tokenizer = GGUFSource(tiny_gguf).tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" movie", add_special_tokens=False)) == [
        "▁movie"]
    assert list((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json"))
    again = GGUFSource(tiny_gguf).tokenizer()  # from the cache
    assert again.encode(" a great plot") == tokenizer.encode(" a great plot")


def test_a_tokenizer_dir_that_does_not_match_the_gguf_is_refused(
        tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZORBA_EDGE_CACHE", str(tmp_path / "cache"))
    _char_level(tiny_gguf).save_pretrained(tmp_path / "broken_tok")
    with pytest.raises(ModelSourceError, match="--tokenizer DIR"):
        open_source(tiny_gguf, tokenizer_dir=tmp_path / "broken_tok").tokenizer()
    good = tmp_path / "good_tok"
    build_sentencepiece_bpe(read_gguf_vocab(tiny_gguf)).save_pretrained(good)
    assert open_source(tiny_gguf, tokenizer_dir=good).tokenizer().encode(" fun", add_special_tokens=False)


def test_the_exported_checkpoint_tokenises_like_the_gguf_and_its_shards_are_readable(
        tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZORBA_EDGE_CACHE", str(tmp_path / "cache"))
    source = GGUFSource(tiny_gguf)
    table = CoefficientTable(4, source.config.num_hidden_layers)
    old_umask = os.umask(0o022)
    try:
        out = export_checkpoint(source, table, 0, tmp_path / "export")
    finally:
        os.umask(old_umask)
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "great movie, terrible plot"
    assert reloaded.encode(text) == source.tokenizer().encode(text)
    assert reloaded.convert_ids_to_tokens(reloaded.encode("great", add_special_tokens=False)) == ["great"]
    for shard in out.glob("*.safetensors"):
        assert stat.S_IMODE(shard.stat().st_mode) == 0o644, shard
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([reloaded.encode(text)])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def _count_metadata_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each GGUF metadata parse, whoever constructs the reader (us or transformers)."""
    from gguf import GGUFReader

    parses: list[str] = []
    build_fields = GGUFReader._build_fields

    def counted(self: GGUFReader, offs: int, count: int) -> int:
        parses.append(str(self.data.filename))
        return build_fields(self, offs, count)

    monkeypatch.setattr(GGUFReader, "_build_fields", counted)
    return parses


def test_opening_a_gguf_parses_its_metadata_once_with_or_without_a_cached_tokenizer(
        tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZORBA_EDGE_CACHE", str(tmp_path / "cache"))
    parses = _count_metadata_parses(monkeypatch)
    first = open_source(tiny_gguf)
    first.tokenizer()  # built from the vocabulary, checked and cached
    assert len(parses) == 1
    parses.clear()
    again = open_source(tiny_gguf)
    assert again.tokenizer().encode(" a great plot") == first.tokenizer().encode(" a great plot")
    assert len(parses) == 1
    parses.clear()
    good = tmp_path / "good_tok"
    first.tokenizer().save_pretrained(good)
    open_source(tiny_gguf, tokenizer_dir=good).tokenizer()  # checked against the vocabulary
    assert len(parses) == 1
