"""Losses: label-word classification and completion-only LM loss, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fixtures_text import FILLER, make_table_lm, make_tiny_gpt2, make_tiny_llama, make_tokenizer

from zorba_edge.data.batches import IGNORE_INDEX, ClassificationBatch, LMBatch
from zorba_edge.data.collate import ClassificationCollator, LMCollator
from zorba_edge.data.examples import ClassificationExample, GenerationExample
from zorba_edge.data.templates import SENTIMENT_TEMPLATE, PromptTemplate
from zorba_edge.engine.losses import (
    accuracy,
    classification_loss,
    evaluate_classification,
    label_scores,
    last_token_positions,
    lm_loss,
    lm_row_losses,
)

REVIEWS = [
    ClassificationExample("the movie was fun !", 1),
    ClassificationExample(" ".join(FILLER[:40]), 0),
    ClassificationExample("bad", 0),
    ClassificationExample("not very good acting", 1),
]
PAIRS = [
    GenerationExample("Question : what ?", "yes ."),
    GenerationExample(" ".join(FILLER[:30]), "no . yes"),
    GenerationExample("why", "w1 w2 w3"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def classify_batch(tokenizer, side="right", seq_len=16) -> ClassificationBatch:
    return ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=seq_len,
                                  padding_side=side)(REVIEWS)


def lm_batch(tokenizer, side="right", seq_len=16, pairs=PAIRS) -> LMBatch:
    return LMCollator(tokenizer, seq_len=seq_len, padding_side=side)(pairs)


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    norm = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - norm for v in values]


@pytest.mark.parametrize("side", ["right", "left"])
def test_classification_loss_is_cross_entropy_over_label_words_after_the_prompt(tokenizer, side):
    model = make_table_lm(len(tokenizer))
    batch = classify_batch(tokenizer, side)
    table = model.table.detach().tolist()
    words = batch.label_tokens[:, 0].tolist()
    expected = 0.0
    for example in REVIEWS:
        # Every rendered prompt ends with "was": the table LM's logits there predict the label.
        last = tokenizer.convert_tokens_to_ids("was")
        expected -= log_softmax([table[last][w] for w in words])[example.label]
    loss = classification_loss(model, batch)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected / len(REVIEWS), rel=1e-5)


def test_classification_reads_the_last_real_token_not_the_padding(tokenizer):
    model = make_table_lm(len(tokenizer))
    batch = classify_batch(tokenizer)
    with torch.no_grad():
        # Make the padding token predict the wrong label overwhelmingly: a loss that read the
        # last position instead of the last real token would blow up.
        model.table[tokenizer.pad_token_id] = 0.0
        model.table[tokenizer.pad_token_id, batch.label_tokens[:, 0][1]] = 50.0
        model.table[tokenizer.pad_token_id, batch.label_tokens[:, 0][0]] = -50.0
    clean = classification_loss(model, batch).item()
    assert clean < 5.0
    assert last_token_positions(batch.attention_mask).tolist() == [
        int(n) - 1 for n in batch.attention_mask.sum(dim=1)
    ]


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2])
def test_left_and_right_padding_give_the_same_losses(tokenizer, make_model):
    # GPT-2's learned absolute positions make this fail unless left-padded rows get
    # position ids that count only real tokens.
    model = make_model(len(tokenizer))
    with torch.inference_mode():
        right = classification_loss(model, classify_batch(tokenizer, "right"))
        left = classification_loss(model, classify_batch(tokenizer, "left"))
        lm_right = lm_loss(model, lm_batch(tokenizer, "right"))
        lm_left = lm_loss(model, lm_batch(tokenizer, "left"))
    assert left.item() == pytest.approx(right.item(), abs=1e-5)
    assert lm_left.item() == pytest.approx(lm_right.item(), abs=1e-5)


def test_losses_are_differentiable_and_match_a_direct_autograd_reference(tokenizer):
    model = make_table_lm(len(tokenizer))
    batch = classify_batch(tokenizer)
    classification_loss(model, batch).backward()
    ours = model.table.grad.clone()
    model.table.grad = None
    last = last_token_positions(batch.attention_mask)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    scores = logits[torch.arange(len(batch)), last][:, batch.label_tokens[:, 0]]
    F.cross_entropy(scores, batch.labels).backward()
    assert torch.allclose(ours, model.table.grad)
    assert ours.abs().sum() > 0


def test_inference_mode_and_low_precision_models_give_fp32_scalars(tokenizer):
    batch, lm = classify_batch(tokenizer), lm_batch(tokenizer)
    full, half = make_table_lm(len(tokenizer)), make_table_lm(len(tokenizer), dtype=torch.bfloat16)
    with torch.inference_mode():
        for model in (full, half):
            for loss in (classification_loss(model, batch), lm_loss(model, lm)):
                assert loss.dtype == torch.float32 and loss.ndim == 0
                assert torch.isfinite(loss)
        # bf16 logits are upcast, not computed in bf16: the loss stays close to fp32's.
        assert classification_loss(half, batch).item() == pytest.approx(
            classification_loss(full, batch).item(), rel=2e-2
        )


def test_lm_loss_is_the_mean_over_examples_of_completion_token_cross_entropy(tokenizer):
    model = make_table_lm(len(tokenizer))
    batch = lm_batch(tokenizer)
    table = model.table.detach().tolist()
    per_example = []
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        losses = [
            -log_softmax(table[ids[t]])[labels[t + 1]]
            for t in range(len(ids) - 1)
            if labels[t + 1] != IGNORE_INDEX
        ]
        per_example.append(sum(losses) / len(losses))
    assert lm_loss(model, batch).item() == pytest.approx(sum(per_example) / 3, rel=1e-5)


def test_lm_loss_ignores_prompt_tokens_and_depends_on_completion_tokens(tokenizer):
    # The table LM's prediction at a position depends only on the token there, so the prompt
    # can only matter through its targets, which must be ignored: changing every prompt token
    # but the last (which predicts the first completion token) must not change the loss.
    model = make_table_lm(len(tokenizer))
    base = lm_loss(model, lm_batch(tokenizer, pairs=[GenerationExample("w1 w2 w3 why", "yes no")]))
    other_prompt = lm_batch(tokenizer, pairs=[GenerationExample("w7 the film w9 why", "yes no")])
    other_completion = lm_batch(tokenizer, pairs=[GenerationExample("w1 w2 w3 why", "yes yes")])
    assert lm_loss(model, other_prompt).item() == pytest.approx(base.item(), rel=1e-6)
    assert abs(lm_loss(model, other_completion).item() - base.item()) > 1e-3


def test_lm_loss_would_change_if_prompt_targets_were_not_ignored(tokenizer):
    # Guards the test above: the collator's IGNORE_INDEX on the prompt is what removes it.
    model = make_table_lm(len(tokenizer))
    batch = lm_batch(tokenizer)
    exposed = torch.where(batch.attention_mask.bool(), batch.input_ids, IGNORE_INDEX)
    leaky = LMBatch(batch.input_ids, batch.attention_mask, exposed)
    assert abs(lm_loss(model, leaky).item() - lm_loss(model, batch).item()) > 1e-3


def test_lm_loss_refuses_a_batch_without_targets(tokenizer):
    batch = lm_batch(tokenizer)
    empty = LMBatch(batch.input_ids, batch.attention_mask, torch.full_like(batch.labels, -100))
    with pytest.raises(ValueError, match="no target tokens"):
        lm_loss(make_table_lm(len(tokenizer)), empty)


def test_predict_and_accuracy_take_the_argmax_over_label_words(tokenizer):
    model = make_table_lm(len(tokenizer))
    batch = classify_batch(tokenizer)
    was = tokenizer.convert_tokens_to_ids("was")
    with torch.no_grad():
        model.table[was, batch.label_tokens[:, 0][1]] = 10.0  # every prompt ends in "was"
        model.table[was, batch.label_tokens[:, 0][0]] = -10.0
    assert label_scores(model, batch).argmax(dim=-1).tolist() == [1, 1, 1, 1]
    assert accuracy(model, [batch]) == pytest.approx(0.5)  # labels are [1, 0, 0, 1]
    result = evaluate_classification(model, [batch, batch])
    assert result.examples == 8 and result.accuracy == pytest.approx(0.5)
    assert result.loss == pytest.approx(classification_loss(model, batch).item(), rel=1e-5)


def test_rows_without_real_tokens_are_refused():
    with pytest.raises(ValueError, match=r"rows \[1\] have no real tokens"):
        last_token_positions(torch.tensor([[1, 1, 0], [0, 0, 0]]))


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2])
@pytest.mark.parametrize("side", ["right", "left"])
def test_label_scores_from_the_kept_positions_equal_those_of_the_full_logits(
    tokenizer, make_model, side
):
    # The head runs only at the prompts' last positions (logits_to_keep); the scores must
    # equal those read off the full (batch, seq_len, vocab) logits.
    from zorba_edge.engine.losses import forward_logits, label_scores, last_token_positions

    model = make_model(len(tokenizer)).eval()
    batch = classify_batch(tokenizer, side=side)
    with torch.no_grad():
        full = forward_logits(model, batch.input_ids, batch.attention_mask).log_softmax(-1)
        rows = torch.arange(len(batch))
        expected = full[rows, last_token_positions(batch.attention_mask)][:, batch.label_tokens[:, 0]]
        assert torch.allclose(label_scores(model, batch), expected, atol=1e-5)


MULTI = PromptTemplate(("neg", "pos", "meh"), (" very bad", " great", " not very great"), suffix=" It was")


def test_multi_token_label_scores_equal_a_hand_computation(tokenizer):
    """Table LM: position t's logits are table[token t], so a label's score is a sum we can
    write out: log p(w1 | was) + log p(w2 | w1) + ..."""
    from zorba_edge.engine.losses import label_scores

    model = make_table_lm(len(tokenizer))
    batch = ClassificationCollator(tokenizer, MULTI, seq_len=16)(REVIEWS)
    assert batch.label_lengths.tolist() == [2, 1, 3]
    table = model.table.detach().tolist()
    ids = tokenizer.convert_tokens_to_ids

    def log_p(after: str, token: str) -> float:
        return log_softmax(table[ids(after)])[ids(token)]

    hand = [
        log_p("was", "very") + log_p("very", "bad"),
        log_p("was", "great"),
        log_p("was", "not") + log_p("not", "very") + log_p("very", "great"),
    ]
    with torch.no_grad():
        scores = label_scores(model, batch)
    for row in scores.tolist():
        assert row == pytest.approx(hand, rel=1e-5)
    loss = classification_loss(model, batch).item()
    expected = -sum(log_softmax(hand)[e.label] for e in REVIEWS) / len(REVIEWS)
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_multi_token_scores_on_a_real_model_equal_full_sequence_log_likelihoods(tokenizer, side):
    from zorba_edge.engine.losses import label_scores

    model = make_tiny_llama(len(tokenizer))
    batch = ClassificationCollator(tokenizer, MULTI, seq_len=16, padding_side=side)(REVIEWS)
    with torch.no_grad():
        scores = label_scores(model, batch)
        for row in range(len(REVIEWS)):
            prompt = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            for label, length in enumerate(batch.label_lengths.tolist()):
                word = batch.label_tokens[label, :length].tolist()
                logits = model(input_ids=torch.tensor([prompt + word])).logits[0].log_softmax(-1)
                hand = sum(float(logits[len(prompt) - 1 + j, t]) for j, t in enumerate(word))
                assert scores[row, label].item() == pytest.approx(hand, abs=1e-4)


def test_the_lm_loss_softmaxes_row_by_row_and_ignores_what_has_no_target(tokenizer):
    """lm_row_losses takes each row's log-softmax on its logits as they are (no gathered copy
    of every target's logits, which a CPU client's peak held beyond the memory model): the
    same per-row means as the gathered formula."""
    model = make_table_lm(len(tokenizer))
    batch = lm_batch(tokenizer, "right")
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        targets = batch.labels[:, 1:]
        expected = []
        for row in range(len(batch)):
            keep = targets[row] != IGNORE_INDEX
            if keep.any():
                expected.append(F.cross_entropy(logits[row, :-1][keep], targets[row][keep]))
        rows = lm_row_losses(model, batch)
        assert torch.allclose(rows, torch.stack(expected), rtol=1e-6, atol=1e-7)
        assert lm_loss(model, batch).item() == pytest.approx(torch.stack(expected).mean().item())
