"""The round-end revert: the assigned blocks put back to their round-start bits (docs/design.md §2).

A round's local steps move the assigned blocks (perturbations and local updates, each one
fp32 rounding); the next sync must start from the global model, bit for bit. Two cheaper ways
back were measured and refused:

- undoing the moves in reverse (theta - s z after each theta + s z) loses a bit wherever a
  move crossed into a coarser binade or hit a round-half-even tie: on SmolLM2-135M's block 5,
  1.4% of the elements come back wrong after one step's perturbations alone, 7.4% after 8
  steps and 23% after 8 steps at the default trust radius (`tests/test_snapshot.py` keeps a
  small case of it). Keeping what each lossy move destroyed costs more than a copy;
- rebuilding from base + alpha replays up to K directions per block (a whole column), and a
  synced block is not bit for bit its rebuild (zorba_edge.engine.coefficients).

So the revert keeps the bytes, but off the memory budget: `SpilledSnapshot` (what a client
uses) writes them to an unlinked file and drops them from the page cache, and reads them back
into the parameters' own storage at the end of the round. RAM cost: nothing on a CPU device,
one tensor's staging copy on an accelerator. `RoundSnapshot` keeps them in host memory, for a
process with no memory budget that reverts round after round (the simulator, into
`SnapshotBuffers` kept between rounds).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Protocol

import torch

from zorba_edge.engine.directions import BlockTensors

RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
"""File systems whose files live in memory: a spill there would cost the RAM it saves."""


class Snapshot(Protocol):
    def revert(self) -> None:
        """Put every assigned tensor back to its round-start value, bit for bit."""

    def close(self) -> None:
        """Let go of what the snapshot holds (a revert after this is an error)."""


class SnapshotBuffers:
    """Host tensors that `RoundSnapshot` copies into instead of allocating its own, kept
    between rounds: for a process that snapshots the same tensors round after round and has
    no device footprint to keep small (the simulator). A fresh 0.5 GB copy a round cost
    SmolLM2's simulated round 0.4 s of allocation and page faults; a copy into warm buffers
    costs about a revert."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int], torch.Tensor] = {}

    def copy_of(self, block: int, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s values in the host buffer kept for (block, index); a buffer of another
        shape or dtype is replaced."""
        held = self._held.get((block, index))
        if held is None or held.shape != tensor.shape or held.dtype != tensor.dtype:
            held = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            self._held[(block, index)] = held
        return held.copy_(tensor.detach())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._held.values())


class RoundSnapshot:
    """A host-memory copy of the assigned blocks, taken at round start, for the exact revert
    (into `buffers` when given, else into tensors of its own)."""

    def __init__(self, blocks: BlockTensors, buffers: SnapshotBuffers | None = None) -> None:
        self._blocks = blocks
        self._saved = {
            block: [tensor.detach().to("cpu", copy=True) if buffers is None
                    else buffers.copy_of(block, i, tensor)
                    for i, (_, tensor) in enumerate(tensors)]
            for block, tensors in blocks.items()
        }

    @torch.no_grad()
    def revert(self) -> None:
        for block, tensors in self._blocks.items():
            for (_, tensor), saved in zip(tensors, self._saved[block], strict=True):
                tensor.copy_(saved)

    def close(self) -> None:
        self._saved = {}


class SpilledSnapshot:
    """The assigned blocks' bytes in an unlinked file in `directory`, out of the page cache.

    Written tensor by tensor straight from the parameters' storage (CPU) or through one
    tensor's host copy (an accelerator), synced and dropped from the page cache, so the copy
    costs disk, not memory; `revert` reads the bytes back the same way. The file has no name
    (O_TMPFILE where the OS has it), so a crash leaves nothing behind.
    """

    def __init__(self, blocks: BlockTensors, directory: str | Path | None = None) -> None:
        self._blocks = blocks
        where: str | Path = directory or "the temporary directory"
        self._file: IO[bytes] | None = None
        try:
            where = spill_directory(directory)
            self._file = tempfile.TemporaryFile(dir=where)
            for tensors in blocks.values():
                for _, tensor in tensors:
                    self._file.write(_host_bytes(tensor))
            self._file.flush()
            _drop_cached(self._file)
        except OSError as error:
            self.close()
            raise OSError(error.errno, f"the round snapshot could not be spilled to {where} "
                          f"({error.strerror or error}): point TMPDIR at a writable directory "
                          "on disk with room for the assigned blocks") from error
        except BaseException:
            self.close()
            raise

    @torch.no_grad()
    def revert(self) -> None:
        if self._file is None:
            raise RuntimeError("this snapshot was closed: nothing to revert to")
        self._file.seek(0)
        for tensors in self._blocks.values():
            for _, tensor in tensors:
                _read_into(self._file, tensor)
        # The pages just read are clean cache, freed with the file at `close`, which the
        # round does next: no sync or drop here (one was 60 ms a round on a busy disk).

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def nbytes(self) -> int:
        """Bytes on disk (the file's size)."""
        return 0 if self._file is None else os.fstat(self._file.fileno()).st_size


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's storage as bytes (no copy)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy().data)


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        return _bytes_view(tensor)
    return _bytes_view(tensor.detach().to("cpu", copy=True).contiguous())


def _read_into(file: IO[bytes], tensor: torch.Tensor) -> None:
    direct = tensor.device.type == "cpu" and tensor.is_contiguous()
    target = tensor if direct else torch.empty(tensor.shape, dtype=tensor.dtype)
    view = _bytes_view(target)
    done = 0
    while done < len(view):
        count = file.readinto(view[done:])  # type: ignore[attr-defined]
        if not count:
            raise OSError(f"the round snapshot file ended early ({done} of {len(view)} bytes of a tensor)")
        done += count
    if not direct:
        tensor.copy_(target)


def _drop_cached(file: IO[bytes]) -> None:
    """Write the file's pages out and drop them from the page cache: otherwise the copy
    would sit in RAM as cache, out of the process's resident size but not out of the
    device's memory (where the OS has no such call, the kernel is left to evict them)."""
    fd = file.fileno()
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def spill_directory(directory: str | Path | None = None) -> Path:
    """Where a spill goes: `directory`, else the system's temporary directory unless that lives
    in RAM (a tmpfs /tmp), then the user's cache directory."""
    if directory is not None:
        chosen = Path(directory)
    else:
        chosen = Path(tempfile.gettempdir())
        if filesystem_type(chosen) in RAM_FILESYSTEMS:
            chosen = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zorba-edge"
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system `path` is on (Linux's /proc/self/mountinfo; None elsewhere)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, line.split(" - ", 1)[1].split()[0]
    return kind
