"""The drift probe: the generic-text loss's rise under random moves of every block (tiny models)."""

from __future__ import annotations

import pytest
import torch
from fixtures_text import make_table_lm, make_tokenizer

from zorba_edge.engine.drift_tolerance import perturb_, probe
from zorba_edge.engine.fluency import generic_batch, generic_loss


def _model_and_batch() -> tuple[torch.nn.Module, list[torch.nn.Parameter], object]:
    # A bigram table: its loss is convex in the table, so every direction's curvature is > 0.
    tokenizer = make_tokenizer()
    model = make_table_lm(len(tokenizer), seed=3)
    params = list(model.parameters())
    text = " ".join(["the movie was fun and the plot was good"] * 6)
    batch = generic_batch(tokenizer, seq_len=16, text=text)
    return model, params, batch


def test_the_curvature_is_the_antithetic_rise_measured_directly_and_the_weights_come_back():
    model, params, batch = _model_and_batch()
    before = [p.detach().clone() for p in params]
    result = probe(model, params, batch, radius=0.05, directions=2, seed=4)
    # The model is back where it was (up to fp32 rounding of +s, -2s, +s).
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)
    # The same moves made by hand, on a copy of the weights: the loss at base +- s z.
    base = generic_loss(model, batch)
    assert result.base_loss == pytest.approx(base, rel=1e-6)
    rises = []
    for seed in (4 * 1_000_003, 4 * 1_000_003 + 1):
        with torch.no_grad():
            perturb_(params, result.move, seed)
            plus = generic_loss(model, batch)
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
            perturb_(params, -result.move, seed)
            minus = generic_loss(model, batch)
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        rises.append(((plus + minus) / 2 - base) / base)
    assert result.rises == pytest.approx(rises, rel=1e-3, abs=1e-7)
    assert result.curvature == pytest.approx(sum(rises) / 2 / result.move ** 2, rel=1e-3)
    # The quadratic law it reports predicts the rise at another move.
    with torch.no_grad():
        perturb_(params, result.move / 2, 99)
        half_plus = generic_loss(model, batch)
        perturb_(params, -result.move, 99)
        half_minus = generic_loss(model, batch)
    predicted = result.curvature * (result.move / 2) ** 2
    assert ((half_plus + half_minus) / 2 - base) / base == pytest.approx(predicted, rel=0.5)


def test_the_first_move_is_a_fraction_of_the_weights_rms_and_a_large_rise_tries_a_smaller_move():
    model, params, batch = _model_and_batch()
    rms = float(torch.sqrt(sum(p.detach().double().square().sum() for p in params)
                           / sum(p.numel() for p in params)))
    gentle = probe(model, params, batch, radius=0.01, directions=1)
    assert gentle.move == pytest.approx(0.01 * rms, rel=1e-9)
    assert gentle.curvature > 0
    # A first move far past the quadratic regime (the tiny model's loss doubles there) is
    # replaced by smaller ones until the rise is within max_rise, or the attempts run out.
    rough = probe(model, params, batch, radius=3.0, directions=1, max_rise=0.05, max_attempts=8)
    assert rough.move < 3.0 * rms / 2
    assert sum(rough.rises) / len(rough.rises) <= 0.05


def test_a_probe_needs_a_direction_and_a_move():
    model, params, batch = _model_and_batch()
    with pytest.raises(ValueError):
        probe(model, params, batch, directions=0)
    with pytest.raises(ValueError):
        probe(model, params, batch, radius=0.0)
