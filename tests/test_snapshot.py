"""The round-end revert: back to the round-start bits, with the copy on disk, not in memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from zorba_edge.engine.directions import BlockTensors, Direction
from zorba_edge.engine.snapshot import SpilledSnapshot, filesystem_type, spill_directory


def blocks_of(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> BlockTensors:
    generator = torch.Generator().manual_seed(0)
    return {b: [(f"w{i}", (0.05 * torch.randn(shape, generator=generator)).to(dtype))
                for i, shape in enumerate(shapes)] for b in (0, 3)}


def bits(blocks: BlockTensors) -> list[torch.Tensor]:
    return [t.detach().clone() for tensors in blocks.values() for _, t in tensors]


def same_bits(blocks: BlockTensors, saved: list[torch.Tensor]) -> bool:
    now = [t for tensors in blocks.values() for _, t in tensors]
    return all(torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)
               for a, b in zip(now, saved, strict=True))


def antithetic_moves(blocks: BlockTensors, steps: int, mu: float = 1e-3) -> None:
    """What a round of antithetic steps does to the blocks: +mu, -2 mu, +(mu - lr g)."""
    for k in range(steps):
        z = Direction(blocks, 7, k)
        z.add_(mu)
        z.add_(-2 * mu)
        z.add_(mu - 1e-4 * (k - 2.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_spilled_snapshot_reverts_a_round_of_steps_bit_for_bit(dtype: torch.dtype, tmp_path: Path) -> None:
    blocks = blocks_of((64, 48), (48,), (3, 5, 7), dtype=dtype)
    start = bits(blocks)
    snapshot = SpilledSnapshot(blocks, tmp_path)
    antithetic_moves(blocks, 6)
    assert not same_bits(blocks, start)
    snapshot.revert()
    assert same_bits(blocks, start)
    snapshot.close()


def test_the_spill_is_a_nameless_file_of_the_blocks_bytes(tmp_path: Path) -> None:
    blocks = blocks_of((64, 48), (48,))
    snapshot = SpilledSnapshot(blocks, tmp_path)
    assert snapshot.nbytes() == sum(t.numel() * t.element_size() for ts in blocks.values() for _, t in ts)
    assert os.listdir(tmp_path) == []  # nothing a crash could leave behind
    snapshot.close()
    with pytest.raises(RuntimeError, match="closed"):
        snapshot.revert()


def test_undoing_the_moves_in_reverse_does_not_give_the_round_start_back() -> None:
    """Why the revert keeps a copy: each move is one fp32 rounding, and the moves undone in
    reverse (theta - s z) miss the start wherever a move crossed a binade or hit a tie."""
    blocks = blocks_of((256, 256))
    start = bits(blocks)
    moves = [(k, s) for k in range(4) for s in (1e-3, -2e-3, 1e-3 - 3e-5)]
    for k, s in moves:
        Direction(blocks, 7, k).add_(s)
    for k, s in reversed(moves):
        Direction(blocks, 7, k).add_(-s)
    assert not same_bits(blocks, start)


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 0:31 / /tmp rw,nosuid shared:14 - tmpfs tmpfs rw
36 22 0:32 / /data/my\\040disk rw shared:15 - xfs /dev/vdb rw
"""


def test_the_file_system_of_a_path_is_its_longest_mount_point() -> None:
    assert filesystem_type(Path("/tmp/x/y"), MOUNTINFO) == "tmpfs"
    assert filesystem_type(Path("/tmpfoo"), MOUNTINFO) == "ext4"
    assert filesystem_type(Path("/data/my disk/spill"), MOUNTINFO) == "xfs"
    assert filesystem_type(Path("/home/u"), MOUNTINFO) == "ext4"


def test_a_spill_goes_where_it_is_told_and_never_to_a_ram_temp_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert spill_directory(tmp_path / "here") == tmp_path / "here"
    from zorba_edge.engine import snapshot

    monkeypatch.setattr(snapshot, "filesystem_type", lambda path: "tmpfs")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert spill_directory() == tmp_path / "cache" / "zorba-edge"


def test_a_spill_that_cannot_be_written_says_where_and_what_to_do(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(OSError, match="TMPDIR"):
        SpilledSnapshot(blocks_of((4, 4)), blocked / "spill")
