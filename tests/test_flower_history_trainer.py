"""A Flower node's weights follow the run's history in place, whichever process holds them: a
process at an older version catches up by applying the versions it lacks, a fresh one replays
from base, and both land on the bits of a model that followed every round (zorba_sim's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_text import make_tokenizer
from test_trainer import HYPER, examples
from tiny_models import tiny_llama_config

from zorba_common.messages import AlphaDelta, RunInfo
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.trainer import SyncError
from zorba_edge.engine.coefficients import AlphaIncrement, apply_increments_, block_materializer
from zorba_edge.model.loading import LoadConfig, load_model
from zorba_edge.model.sources import RandomInitSource
from zorba_flower.history_trainer import HistoryTrainer

BLOCKS = 3
SEED = 5


@pytest.fixture(scope="module")
def source() -> RandomInitSource:
    return RandomInitSource(tiny_llama_config(num_layers=BLOCKS, vocab=160), seed=1,
                            tokenizer=make_tokenizer())


def trainer(source: RandomInitSource, frozen: str = "fp32") -> HistoryTrainer:
    run = RunInfo(run_id="r", seed=SEED, pool_size=16, num_blocks=BLOCKS,
                  model_fingerprint=source.fingerprint, hyper=HYPER, round_duration_s=60,
                  poll_timeout_s=10, max_abs_scalar=1e4)
    return HistoryTrainer(source, LoadConfig(frozen_dtype=frozen), run,
                          LocalTask(examples(8), source.tokenizer(), seed=2))


def history(rounds: int, seed: int = 0) -> tuple[AlphaDelta, ...]:
    """Rounds touching overlapping pool indices and blocks, values of a real run's size."""
    rng = np.random.default_rng(seed)
    out = []
    for v in range(1, rounds + 1):
        ks = tuple(sorted(rng.choice(6, 3, replace=False).tolist()))  # 6 indices: they recur
        blocks = tuple(sorted(rng.choice(BLOCKS, 2, replace=False).tolist()))
        out.append(AlphaDelta.from_matrix(v, v, ks, blocks, rng.normal(0, 3e-3, (3, 2))))
    return tuple(out)


def weights(t: HistoryTrainer) -> dict[str, torch.Tensor]:
    assert t.loaded is not None
    return {n: p.detach().clone() for n, p in t.loaded.model.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def followed_in_place(source: RandomInitSource, rounds: tuple[AlphaDelta, ...]) -> dict[str, torch.Tensor]:
    """zorba_sim's model: every block trainable in fp32 from base, each round applied in place."""
    loaded = load_model(source, range(BLOCKS), LoadConfig(frozen_dtype="fp32"))
    blocks = {b: loaded.trainable_parameters(b) for b in range(BLOCKS)}
    for delta in rounds:
        apply_increments_(blocks, SEED, [AlphaIncrement(k, b, v) for k, b, v in delta.entries()])
    return {n: p.detach().clone() for n, p in loaded.model.state_dict().items()}


def test_a_process_behind_catches_up_in_place_to_the_bits_of_one_that_followed_every_round(
        source: RandomInitSource) -> None:
    h = history(6)
    every = trainer(source)  # served the node every round
    for v in range(1, len(h) + 1):
        every.follow(h[:v])
        every.hold((0,))
    behind = trainer(source)  # served it at version 2, then other work, now at version 6
    behind.follow(h[:2])
    behind.hold((1,))
    assert behind.follow(h) == 4  # versions 3..6, in place
    behind.hold((0,))
    fresh = trainer(source)  # a fresh process: replays every block from base
    fresh.follow(h)
    fresh.hold((0,))

    reference = followed_in_place(source, h)
    assert every.table.version == behind.table.version == fresh.table.version == 6
    assert same_bits(weights(every), reference)
    assert same_bits(weights(behind), reference)
    assert same_bits(weights(fresh), reference)
    # Not vacuous: a rebuild from the table (the Flower node before) gives other bits.
    rebuild = block_materializer(source.block_state_dict, fresh.table, SEED)(0)
    assert any(not torch.equal(rebuild[n], p) for n, p in fresh.loaded.exact_parameters(0))


def test_frozen_blocks_in_a_narrow_precision_depend_on_the_history_alone(
        source: RandomInitSource) -> None:
    h = history(5, seed=1)
    a, b = trainer(source, "bf16"), trainer(source, "bf16")
    a.follow(h[:1])
    a.hold((2,))
    a.follow(h[:3])
    a.hold((1, 2))
    a.follow(h)
    a.hold((0,))
    b.follow(h)
    b.hold((0,))
    assert same_bits(weights(a), weights(b))
    # The trainable block is the in-place path's, as in zorba_sim.
    reference = followed_in_place(source, h)
    assert all(torch.equal(p, reference[f"model.layers.0.{n}"]) for n, p in a.loaded.exact_parameters(0))


def test_another_past_starts_over_from_base_and_a_gap_is_refused(source: RandomInitSource) -> None:
    t = trainer(source)
    t.follow(history(3, seed=2))
    t.hold((0,))
    other = history(4, seed=3)
    assert t.follow(other) == 4 and t.loaded is None  # nothing of the old past is kept
    t.hold((0,))
    assert same_bits(weights(t), followed_in_place(source, other))
    with pytest.raises(SyncError, match="version 3, expected 2"):
        t.follow((other[0], other[2]))
