"""The drift probe: the generic-text loss's rise under random moves of every block (tiny models)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fixtures_text import TableLM, make_table_lm, make_tokenizer

from zorba_common.noise import block_direction
from zorba_edge.data.batches import LMBatch
from zorba_edge.engine.directions import BlockTensors, Direction
from zorba_edge.engine.drift_tolerance import PROBE_FIRST_ROW, probe
from zorba_edge.engine.fluency import generic_batch, generic_loss


def _model_and_batch() -> tuple[TableLM, BlockTensors, LMBatch]:
    # A bigram table: its loss is convex in the table, so every direction's curvature is > 0.
    tokenizer = make_tokenizer()
    model = make_table_lm(len(tokenizer), seed=3)
    blocks = {0: [("table", model.table)]}
    text = " ".join(["the movie was fun and the plot was good"] * 6)
    batch = generic_batch(tokenizer, seq_len=16, text=text)
    return model, blocks, batch


class RecordingLM(TableLM):
    """A table LM that keeps a copy of its table at every forward: what the probe moved it to."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(table)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> SimpleNamespace:
        self.seen.append(self.table.detach().clone())
        return super().forward(input_ids, attention_mask, position_ids)


def _at(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def test_the_curvature_is_the_antithetic_rise_along_the_runs_directions() -> None:
    model, blocks, batch = _model_and_batch()
    params = [t for tensors in blocks.values() for _, t in tensors]
    before = [p.detach().clone() for p in params]
    result = probe(model, blocks, batch, radius=0.05, directions=2, seed=4)
    assert len(result.rises) == 2
    # The same moves made by hand with the run's Direction, each from the base weights: the
    # loss at base +- s z[PROBE_FIRST_ROW + d] of run seed 4.
    base = generic_loss(model, batch)
    assert result.base_loss == pytest.approx(base, rel=1e-6)
    rises = []
    for d in range(2):
        z = Direction(blocks, 4, PROBE_FIRST_ROW + d)
        _at(params, before)
        z.add_(result.move)
        plus = generic_loss(model, batch)
        _at(params, before)
        z.add_(-result.move)
        minus = generic_loss(model, batch)
        rises.append(((plus + minus) / 2 - base) / base)
    assert result.rises == pytest.approx(rises, rel=1e-3, abs=1e-7)
    assert result.curvature == pytest.approx(sum(rises) / 2 / result.move ** 2, rel=1e-3)
    # The quadratic law it reports predicts the rise at another move (another direction).
    z = Direction(blocks, 4, 99)
    _at(params, before)
    z.add_(result.move / 2)
    half_plus = generic_loss(model, batch)
    _at(params, before)
    z.add_(-result.move / 2)
    half_minus = generic_loss(model, batch)
    predicted = result.curvature * (result.move / 2) ** 2
    assert ((half_plus + half_minus) / 2 - base) / base == pytest.approx(predicted, rel=0.5)


def test_each_point_is_the_base_moved_along_the_seeded_direction_and_the_weights_come_back() -> None:
    tokenizer = make_tokenizer()
    model = RecordingLM(make_table_lm(len(tokenizer), seed=3).table.detach().clone())
    blocks = {0: [("table", model.table)]}
    batch = generic_batch(tokenizer, seq_len=16, text=" ".join(["the plot was good"] * 8))
    base = model.table.detach().clone()
    directions = 3
    result = probe(model, blocks, batch, radius=0.05, directions=directions, seed=11,
                   max_attempts=0)
    # Forwards: the base, then per direction both sides, visited as a chain (+ -, - +, + -).
    assert len(model.seen) == 1 + 2 * directions
    assert torch.equal(model.seen[0], base)
    sides = [(1, -1), (-1, 1), (1, -1)]
    for d in range(directions):
        # z[PROBE_FIRST_ROW + d] of run seed 11 as zorba_common.noise makes it, not as the
        # probe's own code does: the probe moves along the run's directions.
        (_, z), = block_direction(11, PROBE_FIRST_ROW + d, 0, [("table", base.shape)],
                                  dtype=torch.float32)
        for i, side in enumerate(sides[d]):
            seen = model.seen[1 + 2 * d + i]
            # Each point is at most a few fp32 roundings (of values ~|theta| + s) from
            # theta + side s z: one move from the base, or chained from the last point.
            bound = 4 * torch.finfo(torch.float32).eps * (base.abs() + result.move)
            assert torch.all((seen - (base + side * result.move * z)).abs() <= bound)
    # Back where it was up to the roundings the probe promises: 2 x directions + 1 moves,
    # each one fp32 rounding of a value within |theta| + s.
    moves = 2 * directions + 1
    bound = moves * torch.finfo(torch.float32).eps / 2 * (base.abs() + result.move)
    assert torch.all((model.table.detach() - base).abs() <= bound)


def test_the_first_move_is_a_fraction_of_the_weights_rms_and_a_large_rise_tries_a_smaller_move() -> None:
    model, blocks, batch = _model_and_batch()
    params = [t for tensors in blocks.values() for _, t in tensors]
    rms = float(torch.sqrt(sum(p.detach().double().square().sum() for p in params)
                           / sum(p.numel() for p in params)))
    gentle = probe(model, blocks, batch, radius=0.01, directions=1)
    assert gentle.move == pytest.approx(0.01 * rms, rel=1e-9)
    assert gentle.curvature > 0
    # A first move far past the quadratic regime (the tiny model's loss doubles there) is
    # replaced by smaller ones until the rise is within max_rise, or the attempts run out.
    rough = probe(model, blocks, batch, radius=3.0, directions=1, max_rise=0.05, max_attempts=8)
    assert rough.move < 3.0 * rms / 2
    assert sum(rough.rises) / len(rough.rises) <= 0.05


def test_a_probe_needs_a_direction_and_a_move() -> None:
    model, blocks, batch = _model_and_batch()
    with pytest.raises(ValueError):
        probe(model, blocks, batch, directions=0)
    with pytest.raises(ValueError):
        probe(model, blocks, batch, radius=0.0)
