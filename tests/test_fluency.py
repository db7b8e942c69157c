"""The fluency watch: next-token loss on the packaged generic text, and when it says broken."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures_text import make_table_lm, make_tokenizer

from zorba_common.fluency import broken
from zorba_edge.data.generic_text import GENERIC_TEXT
from zorba_edge.engine.fluency import generic_batch, generic_loss


def test_the_generic_text_is_a_few_hundred_words_cut_into_full_rows_of_targets():
    assert 250 <= len(GENERIC_TEXT.split()) <= 600
    tokenizer = make_tokenizer(add_bos=False)
    batch = generic_batch(tokenizer, seq_len=16)
    rows, width = batch.input_ids.shape
    assert width == 16 and rows == len(tokenizer(GENERIC_TEXT, add_special_tokens=False)["input_ids"]) // 16
    assert torch.equal(batch.labels, batch.input_ids) and bool(batch.attention_mask.all())


def test_every_row_opens_with_the_tokenizers_bos_as_a_task_row_does():
    """Gemma 3 without its BOS continues the generic text with "and and and": a watch on such
    rows judged a model the run never trains."""
    tokenizer = make_tokenizer(add_bos=True)
    text = tokenizer(GENERIC_TEXT, add_special_tokens=False)["input_ids"]
    batch = generic_batch(tokenizer, seq_len=16)
    rows, width = batch.input_ids.shape
    assert width == 16 and rows == len(text) // 15
    assert bool((batch.input_ids[:, 0] == tokenizer.bos_token_id).all())
    assert batch.input_ids[:, 1:].flatten().tolist() == text[: rows * 15]


def test_a_short_text_is_one_shorter_row():
    batch = generic_batch(make_tokenizer(add_bos=False), seq_len=64, text="the movie was fun")
    assert batch.input_ids.shape == (1, 4)
    assert generic_batch(make_tokenizer(), seq_len=64, text="the movie was fun").input_ids.shape == (1, 5)


def test_the_loss_is_the_mean_next_token_cross_entropy_and_a_wrecked_model_is_broken():
    tokenizer = make_tokenizer()
    batch = generic_batch(tokenizer, seq_len=8, text="the movie was fun and the plot was good")
    model = make_table_lm(len(tokenizer), seed=1)
    with torch.no_grad():
        logits = model.table[batch.input_ids[:, :-1]].log_softmax(-1)
        by_hand = -logits.gather(-1, batch.input_ids[:, 1:, None]).mean()
    base = generic_loss(model, batch)
    assert base == pytest.approx(float(by_hand), rel=1e-5)
    assert not broken(base, base)
    with torch.no_grad():
        model.table.add_(torch.randn_like(model.table) * 10)  # far from its base weights
    assert broken(base, generic_loss(model, batch))


def test_the_tolerance_is_relative_to_the_base_and_nan_is_broken():
    assert not broken(2.0, 2.3, tolerance=0.2) and broken(2.0, 2.5, tolerance=0.2)
    assert broken(2.0, math.nan) and broken(2.0, math.inf)
