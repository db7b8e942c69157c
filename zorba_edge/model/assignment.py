"""A round's assignment as the model takes it: checked once, then trusted.

An assignment enters the client from the wire (`Assignment.blocks`, whose indices the schema
only knows are >= 0). `check_assignment` turns it into `Blocks`, the sorted unique indices of
blocks that exist, and every step below it (the trainer's hold, `LoadedModel.reassign`, the
installs per block) takes `Blocks` as proof and does not walk the indices again.
"""

from __future__ import annotations

from collections.abc import Iterable

from zorba_common.errors import AssignmentError


class Blocks(tuple[int, ...]):
    """Sorted unique indices of blocks of a model with `num_blocks` blocks; made only by
    `check_assignment`."""

    num_blocks: int

    def __new__(cls, blocks: Iterable[int], num_blocks: int) -> Blocks:
        made = super().__new__(cls, blocks)
        made.num_blocks = num_blocks
        return made


def check_assignment(assignment: Iterable[int], num_blocks: int) -> Blocks:
    """Sorted unique block indices, or AssignmentError naming the bad block and the count;
    `Blocks` already checked for this model pass as they are."""
    if isinstance(assignment, Blocks) and assignment.num_blocks == num_blocks:
        return assignment
    blocks = list(assignment)
    for block in blocks:
        check_block(block, num_blocks)
    return Blocks(sorted(set(blocks)), num_blocks)


def check_block(block: int, num_blocks: int) -> None:
    """AssignmentError unless `block` is the index of one of the model's blocks."""
    if isinstance(block, bool) or not isinstance(block, int):
        raise AssignmentError(f"assignment entry {block!r} is not a block index (an int)")
    if not 0 <= block < num_blocks:
        raise AssignmentError(
            f"block {block} does not exist: the model has {num_blocks} blocks "
            f"(0..{num_blocks - 1})"
        )
