"""A round's assignment is checked once, where it enters the client (the trainer), and the
model trusts it on the way down to the blocks; a malformed one is refused with a clear error."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from test_trainer import assignment, make_trainer, state_of

from zorba_common.errors import AssignmentError
from zorba_edge.model import assignment as assignment_module
from zorba_edge.model import loading
from zorba_edge.model.assignment import Blocks, check_assignment


def test_an_assignment_is_sorted_unique_and_remembers_the_models_block_count() -> None:
    blocks = check_assignment([2, 0, 2], 3)
    assert blocks == (0, 2) and isinstance(blocks, Blocks) and blocks.num_blocks == 3
    assert check_assignment(blocks, 3) is blocks  # checked once: passed on as it is


@pytest.mark.parametrize(("given", "message"), [
    ([0, 7], r"block 7 does not exist: the model has 3 blocks \(0..2\)"),
    ([-1], "block -1 does not exist"),
    (["1"], r"assignment entry '1' is not a block index \(an int\)"),
    ([True], "assignment entry True is not a block index"),
])
def test_a_malformed_assignment_names_what_is_wrong(given: list[Any], message: str) -> None:
    with pytest.raises(AssignmentError, match=message):
        check_assignment(given, 3)


def test_blocks_checked_for_another_model_are_checked_again() -> None:
    with pytest.raises(AssignmentError, match="block 3 does not exist: the model has 2 blocks"):
        check_assignment(check_assignment([3], 4), 2)


def test_the_trainer_refuses_a_malformed_assignment_and_keeps_its_model() -> None:
    trainer = make_trainer(num_blocks=3)
    trainer.hold((1,))
    before = state_of(trainer, 1)
    with pytest.raises(AssignmentError, match="block 5 does not exist: the model has 3 blocks"):
        trainer.train_round(assignment(1, (0, 5), (1, 2)), threading.Event())
    assert trainer.loaded is not None and trainer.loaded.assignment == (1,)
    for name, tensor in state_of(trainer, 1).items():
        assert tensor.equal(before[name])


def test_a_round_checks_its_blocks_once_and_installs_them_without_another_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(num_blocks=3)
    trainer.hold(())
    made: list[tuple[int, ...]] = []
    block_checks: list[int] = []

    class CountedBlocks(Blocks):
        def __new__(cls, blocks: Any, num_blocks: int) -> CountedBlocks:
            made.append(tuple(blocks))
            return super().__new__(cls, blocks, num_blocks)  # type: ignore[return-value]

    monkeypatch.setattr(assignment_module, "Blocks", CountedBlocks)
    monkeypatch.setattr(loading, "check_block", lambda block, n: block_checks.append(block))
    outcome = trainer.train_round(assignment(1, (2, 0), (1, 2)), threading.Event())

    assert len(outcome.steps) == 2
    assert trainer.loaded is not None and trainer.loaded.assignment == (0, 2)
    assert made == [(0, 2)] and block_checks == []
