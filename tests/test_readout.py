"""The label readout replaces the head's label columns by h @ rows.T and nothing else."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_NAMES, random_model, tiny_config

from zorba_edge.engine.directions import Direction
from zorba_edge.model.readout import LabelReadout

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
