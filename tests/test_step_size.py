"""The step size's one owner (zorba_server/step_size.py) and the client's side of it."""

from __future__ import annotations

import pytest
import torch

from zorba_edge.client.daemon import step_budget_s
from zorba_edge.engine.zo import ZOConfig, weight_scale
from zorba_server.rounds import APPLIED, REJECTED
from zorba_server.step_size import LOSS_JUMP_BACKOFF, PLATEAU_DECAY, StepSize


def test_each_rejection_and_each_plateau_cut_multiplies_the_round_lr() -> None:
    step = StepSize(1e-3)
    assert step.round_lr((), 0) == 1e-3
    two = (REJECTED, APPLIED, REJECTED)
    assert step.round_lr(two, 1) == pytest.approx(1e-3 * LOSS_JUMP_BACKOFF ** 2 * PLATEAU_DECAY)
    assert step.after_backoff(two, 1).lr == pytest.approx(step.round_lr((*two, REJECTED), 1))
    assert step.after_plateau(two, 1).lr == pytest.approx(step.round_lr(two, 2))


def test_dimension_scaling_gives_a_client_mean_block_over_its_perturbed_parameters() -> None:
    params = [10, 30, 20]  # mean 20
    assert StepSize(1e-3, "none").client_scale(params, [0, 1]) == 1.0
    assert StepSize(1e-3, "dimension").client_scale(params, [0, 1]) == pytest.approx(0.5)
    assert StepSize(1e-3, "dimension").client_scale(params, [0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="lr scaling"):
        StepSize(1e-3, "cubic")


def test_the_clients_local_config_multiplies_lr_by_the_directions_and_scales_the_region() -> None:
    blocks = {0: [("w", torch.full((4, 4), 0.5))]}
    config = ZOConfig.for_round(1e-4, 1e-3, 4, 0.03, blocks, 1e6)
    assert config.lr == pytest.approx(4e-4) and config.mu == 1e-3
    assert config.max_move == pytest.approx(0.03 * weight_scale(blocks)) and weight_scale(blocks) == 0.5
    assert ZOConfig.for_round(1e-4, 1e-3, 1, 0.0, blocks, 1e6).max_move == 0.0


def test_the_step_budget_keeps_the_reports_round_trip_and_the_upload_free() -> None:
    assert step_budget_s(30.0, 1.0, 0.0) == 29.0  # no report yet: the margin
    assert step_budget_s(30.0, 1.0, 3.0) == 24.0  # twice the last report's round trip
    assert step_budget_s(30.0, 1.0, 60.0) == 15.0  # at most half the round
    assert step_budget_s(30.0, 1.0, 3.0, upload_s=2.0) == 20.0  # fedavg's upload on top
