"""Offline text fixtures for the data and loss tests: a word-level tokenizer built in code, a
"table" LM whose logits are a lookup on the current token (so losses can be computed by hand),
and a tiny random Llama. Nothing is downloaded."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = (
    "It was great terrible good bad the a movie film plot acting is not very and fun boring "
    "Question Answer yes no what why . , ! : ?"
).split()
FILLER = [f"w{i}" for i in range(100)]


def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer whose vocabulary holds the sentiment label words."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS + FILLER)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]",
    )


class TableLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: each position sees only its own token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def make_table_lm(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> TableLM:
    generator = torch.Generator().manual_seed(seed)
    return TableLM(torch.randn(vocab_size, vocab_size, generator=generator).to(dtype))


def make_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    # Initialise from a private RNG stream so the model never depends on test order.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def make_tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """Learned absolute positions: the case where left padding needs explicit position ids
    (rotary models like Llama only see relative positions, so a shift changes nothing)."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()
