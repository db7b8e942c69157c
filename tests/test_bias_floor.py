"""The bias floor: label offsets fitted on training scores, and the held-out accuracy they give."""

from __future__ import annotations

import pytest
import torch
from fixtures_text import make_table_lm, make_tokenizer

from zorba_edge.data.collate import ClassificationCollator
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.data.templates import SENTIMENT_TEMPLATE
from zorba_edge.engine.bias_floor import (
    ScoredExamples,
    bias_floor_accuracy,
    fit_label_offsets,
    score_examples,
)
from zorba_edge.engine.losses import evaluate_classification


def sampled(offsets: list[float], count: int, seed: int) -> ScoredExamples:
    """Scores whose labels are drawn from softmax(scores + offsets): the model is off by
    exactly -offsets, which a fit must find."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(count, len(offsets), generator=gen, dtype=torch.float64) * 2
    probs = (scores + torch.tensor(offsets, dtype=torch.float64)).softmax(dim=-1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return ScoredExamples(scores, labels)


@pytest.mark.parametrize("offsets", [[0.0, -3.0], [0.0, 2.0, -1.5], [0.0, 1.0, 0.5, -2.0]])
def test_the_fit_recovers_the_offsets_that_generated_the_labels(offsets):
    fitted = fit_label_offsets(sampled(offsets, 20_000, seed=1))
    assert fitted[0] == 0.0
    assert fitted.tolist() == pytest.approx(offsets, abs=0.1)


def test_the_floor_beats_the_unshifted_scores_on_biased_held_out_examples():
    fit, heldout = sampled([0.0, -3.0], 2_000, seed=2), sampled([0.0, -3.0], 2_000, seed=3)
    assert bias_floor_accuracy(fit, heldout) > heldout.accuracy() + 0.05


def test_unbiased_scores_keep_their_accuracy():
    fit, heldout = sampled([0.0, 0.0], 4_000, seed=4), sampled([0.0, 0.0], 4_000, seed=5)
    assert fit_label_offsets(fit).abs().max() < 0.15
    assert bias_floor_accuracy(fit, heldout) == pytest.approx(heldout.accuracy(), abs=0.02)


def test_a_label_no_fit_example_carries_gets_a_finite_offset():
    fit = ScoredExamples(torch.zeros(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))
    offsets = fit_label_offsets(fit)
    assert bool(torch.isfinite(offsets).all()) and offsets[2] < offsets[1]


def test_model_scores_give_the_same_accuracy_as_the_evaluation():
    tokenizer = make_tokenizer()
    reviews = [ClassificationExample(t, y) for t, y in
               [("the movie was fun !", 1), ("bad", 0), ("not very good acting", 1), ("why", 0)]]
    batch = ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=16)(reviews)
    model = make_table_lm(len(tokenizer), seed=3)
    scored = score_examples(model, [batch, batch])
    assert scored.scores.shape == (8, 2) and scored.labels.tolist() == [1, 0, 1, 0] * 2
    assert scored.accuracy() == pytest.approx(evaluate_classification(model, [batch]).accuracy)
