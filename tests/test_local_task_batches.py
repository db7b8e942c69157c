"""Evaluation batches: every example once, shortest first, and the same figures as in order."""

from __future__ import annotations

import torch
from fixtures_text import make_tokenizer
from tiny_models import random_model, tiny_llama_config

from zorba_edge.client.local_task import LocalTask
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.engine.losses import evaluate_classification

TEXTS = ["great", "bad movie bad movie bad movie", "fun movie", "terrible", "good good good movie",
         "boring movie", "great fun movie good", "bad"]


def task() -> LocalTask:
    examples = [ClassificationExample(text, i % 2) for i, text in enumerate(TEXTS)]
    return LocalTask(examples, make_tokenizer())


def test_evaluation_batches_hold_every_example_once_shortest_first() -> None:
    batches = list(task().batches(3, 32))
    widths = [b.input_ids.shape[1] for b in batches]
    assert sum(len(b) for b in batches) == len(TEXTS)
    assert widths == sorted(widths) and widths[0] < widths[-1]


def test_length_order_changes_no_figure() -> None:
    torch.manual_seed(0)
    model = random_model(tiny_llama_config(num_layers=2, vocab=160))
    sorted_result = evaluate_classification(model, list(task().batches(3, 32)))
    one_each = evaluate_classification(model, list(task().batches(1, 32)))  # unpadded, any order
    assert sorted_result.examples == one_each.examples == len(TEXTS)
    assert sorted_result.accuracy == one_each.accuracy
    assert abs(sorted_result.loss - one_each.loss) < 1e-5
