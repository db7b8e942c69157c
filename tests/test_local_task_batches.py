"""Evaluation batches: every example once, shortest first, and the same figures as in order; the
check batch: the same examples every round, costing at most a median-length batch."""

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


def test_the_check_batch_is_the_first_examples_no_longer_than_the_median_every_time() -> None:
    """The loss guard compares check losses across rounds, so the batch is the same each time;
    it costs its longest row, so it takes no example longer than the median (the first examples
    as they come took the longest of them)."""
    local = task()
    lengths = local._trimmed_lengths(32)
    assert lengths is not None
    median = sorted(lengths)[len(lengths) // 2 - 1 : len(lengths) // 2 + 1]
    check = local.check_batch(3, 32)
    wanted = [i for i, n in enumerate(lengths) if 2 * n <= sum(median)][:3]
    assert check.labels.tolist() == [i % 2 for i in wanted]
    assert check.input_ids.shape[1] == max(lengths[i] for i in wanted) < max(lengths[:3])
    assert torch.equal(local.check_batch(3, 32).input_ids, check.input_ids)
    assert torch.equal(task().check_batch(3, 32).input_ids, check.input_ids)  # another process alike


def test_a_check_batch_larger_than_the_short_half_takes_the_longer_examples_in_order() -> None:
    lengths = task()._trimmed_lengths(32)
    assert lengths is not None
    assert task().check_batch(len(TEXTS), 32).input_ids.shape[1] == max(lengths)
    assert task().check_batch(100, 32).input_ids.shape[0] == len(TEXTS)
