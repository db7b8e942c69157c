"""The label readout replaces the head's label columns by h @ rows.T and nothing else."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_NAMES, random_model, tiny_config

from zorba_edge.data.batches import IGNORE_INDEX, ClassificationBatch
from zorba_edge.engine.directions import Direction
from zorba_edge.engine.losses import cached_classification_loss, classification_loss
from zorba_edge.engine.zo import ZOConfig, one_sided_estimate, readout_estimate, record_first_forward
from zorba_edge.model.readout import LabelReadout, attach_readout

LABEL_IDS = (7, 3)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_an_unmoved_readout_changes_no_logit(family: str) -> None:
    model = random_model(tiny_config(family), seed=1).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    readout = LabelReadout(model.get_output_embeddings(), LABEL_IDS)
    handle = readout.attach(model.get_output_embeddings())
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)
    handle.remove()


def test_moving_the_rows_moves_only_the_label_columns_and_keeps_tied_embeddings() -> None:
    model = random_model(tiny_config("llama", tie_word_embeddings=True), seed=2).eval()
    head = model.get_output_embeddings()
    embeddings_before = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    before = _logits(model, ids)
    readout = LabelReadout(head, LABEL_IDS)
    readout.attach(head)
    Direction({0: list(readout.named_parameters())}, run_seed=5, k=0).add_(0.1)
    after = _logits(model, ids)
    labels = torch.tensor(sorted(LABEL_IDS))
    others = torch.tensor([t for t in range(128) if t not in LABEL_IDS])
    torch.testing.assert_close(after[..., others], before[..., others])
    assert (after[..., labels] - before[..., labels]).abs().min() > 0
    torch.testing.assert_close(model.get_input_embeddings().weight, embeddings_before, rtol=0, atol=0)
    # The exported head carries the moved rows, so an untied model reproduces the logits.
    exported = readout.head_weight(head.weight)
    hidden = torch.randn(4, head.weight.shape[1])
    torch.testing.assert_close((hidden @ exported.T)[:, labels], hidden @ readout.rows.T)


def test_a_head_without_the_label_rows_is_refused() -> None:
    model = random_model(tiny_config("llama"), seed=0)
    with pytest.raises(ValueError, match="not rows of a head"):
        LabelReadout(model.get_output_embeddings(), (500,))


def test_the_readout_covers_every_family() -> None:
    for family in FAMILY_NAMES:
        model = random_model(tiny_config(family), seed=0)
        assert LabelReadout(model.get_output_embeddings(), LABEL_IDS).rows.shape[0] == len(LABEL_IDS)


# ---------------------------------------------------------------- the head cache (issue 26)

def _batch(label_tokens: list[list[int]], seed: int = 0, left: bool = False) -> ClassificationBatch:
    """Prompts of 4..9 tokens in rows of 12, right- (or left-) padded, with room for a label."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [4, 9, 6, 7]
    ids = torch.zeros(len(lengths), 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(12 - n, 12) if left else slice(0, n)
        ids[row, span] = torch.randint(1, 128, (n,), generator=gen)
        mask[row, span] = 1
    width = max(len(t) for t in label_tokens)
    tokens = torch.tensor([t + [IGNORE_INDEX] * (width - len(t)) for t in label_tokens])
    labels = torch.randint(0, len(label_tokens), (len(lengths),), generator=gen)
    return ClassificationBatch(ids, mask, tokens, labels)


LABEL_WORDS = {"one-token": [[7], [3]], "multi-token": [[7, 11], [3], [11, 7, 5]]}


@pytest.mark.parametrize(("family", "softcap"), [("llama", None), ("gemma3", None), ("gemma3", 5.0)])
@pytest.mark.parametrize("words", sorted(LABEL_WORDS))
def test_the_cached_loss_equals_the_models_loss_for_any_rows(family: str, softcap: float | None,
                                                             words: str) -> None:
    """One- and multi-token label words, left and right padding, Gemma's final soft-capping."""
    config = tiny_config(family, **({} if softcap is None else {"final_logit_softcapping": softcap}))
    model = random_model(config, seed=3).eval()
    batch = _batch(LABEL_WORDS[words], seed=1, left=words == "one-token")
    token_ids = sorted({t for word in LABEL_WORDS[words] for t in word})
    readout, _ = attach_readout(model, token_ids)
    assert readout.softcap == softcap
    with torch.no_grad(), readout.recording() as calls:
        recorded = classification_loss(model, batch)
    torch.testing.assert_close(cached_classification_loss(calls, readout, batch), recorded,
                               rtol=1e-5, atol=1e-5)
    for k in range(3):  # moved rows: the cache scores them as the model with them attached
        Direction({4: readout.tensors()}, run_seed=9, k=k).add_(0.3)
        with torch.no_grad():
            direct = classification_loss(model, batch)
        torch.testing.assert_close(cached_classification_loss(calls, readout, batch), direct,
                                   rtol=1e-5, atol=1e-5)
        assert float((direct - recorded).abs()) > 1e-4  # the rows did move the loss


def test_a_cache_of_another_loss_is_refused() -> None:
    model = random_model(tiny_config("llama"), seed=0)
    batch = _batch(LABEL_WORDS["multi-token"])
    readout, _ = attach_readout(model, [3, 5, 7, 11])
    with torch.no_grad(), readout.recording() as calls:
        classification_loss(model, batch)
        classification_loss(model, batch)
    with pytest.raises(ValueError, match="recorded head calls"):
        cached_classification_loss(calls, readout, batch)


def test_readout_directions_from_the_cache_are_the_one_sided_estimator_on_the_model() -> None:
    """The cached estimate reports the scalars, and moves the rows, that the one-sided
    estimator over the rows with a forward per direction gives."""
    model = random_model(tiny_config("llama"), seed=4).eval()
    batch = _batch(LABEL_WORDS["one-token"], seed=2)
    readout, _ = attach_readout(model, [3, 7])
    start = readout.rows.detach().clone()
    config = ZOConfig(mu=1e-3, lr=0.5, max_move=0.0)
    loss_fn, calls = record_first_forward(classification_loss, readout)
    with torch.no_grad():
        loss_fn(model, batch)
        loss_fn(model, batch)  # only the first call is recorded
    assert len(calls) == 1
    cached = readout_estimate(readout, 2, calls, batch, 5, [0, 1, 2], config)
    moved = readout.rows.detach().clone()
    readout.rows.data.copy_(start)
    direct = one_sided_estimate(model, {2: readout.tensors()}, classification_loss, batch, 5,
                                [0, 1, 2], config)
    assert cached.forwards == 0 and direct.forwards == 4
    for (k, g), (k2, g2) in zip(cached.steps, direct.steps, strict=True):
        assert k == k2 and g == pytest.approx(g2, rel=1e-3, abs=1e-3)
    torch.testing.assert_close(moved, readout.rows.detach(), rtol=1e-4, atol=1e-5)
    assert float((moved - start).abs().max()) > 0


def test_the_readout_trust_region_bounds_the_rows_step() -> None:
    model = random_model(tiny_config("llama"), seed=4).eval()
    batch = _batch(LABEL_WORDS["one-token"], seed=2)
    readout, _ = attach_readout(model, [3, 7])
    start = readout.rows.detach().clone()
    blocks = {2: readout.tensors()}
    config = ZOConfig.for_round(1e3, 1e-3, 4, 0.01, blocks, 1e6)
    with torch.no_grad(), readout.recording() as calls:
        classification_loss(model, batch)
    estimate = readout_estimate(readout, 2, calls, batch, 5, [0, 1, 2, 3], config)
    assert estimate.shrink < 1.0
    grads = [g for _, g in estimate.steps]
    assert config.lr / 4 * sum(g * g for g in grads) ** 0.5 == pytest.approx(config.max_move)
    # The rows moved about that far (four random directions over 128 parameters are only
    # nearly orthogonal).
    rms_move = float((readout.rows.detach() - start).square().mean().sqrt())
    assert 0.7 * config.max_move < rms_move < 1.3 * config.max_move
