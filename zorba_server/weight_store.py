"""The fedavg baseline's weights on the server: uploads, their average, the served version.

Only the fedavg run mode uses this. Uploads are streamed to disk (never held whole in
memory: four SmolLM2 clients upload 1.7 GB a round), checked against the model's footprint,
and averaged tensor by tensor from memory-mapped files into the next version's file, which
is written (and fsynced) before the round's close is committed: a crash between the two
leaves an unused file that the next close overwrites, never a version without weights.
Version 0 has no file: it is the base model every client already holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from zorba_common.memory_model import ModelFootprint
from zorba_common.weight_files import default_weights_dir, parse_key, version_path
from zorba_server import errors

HEADER_LIMIT = 64 * 1024 * 1024
"""A safetensors header beyond this is not a model's (SmolLM2's is 30 KB)."""


@dataclass(frozen=True)
class Upload:
    client_id: str
    path: Path
    weight: float


def read_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header, without reading the tensors."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > HEADER_LIMIT:
            raise ValueError(f"header of {length} bytes")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def check_layout(layout: Mapping[str, tuple[str, tuple[int, ...]]],
                 footprint: ModelFootprint) -> None:
    """Every block, float32, with the footprint's parameter count; ValueError says what is off."""
    counts = [0] * footprint.num_layers
    for name, (dtype, shape) in layout.items():
        block, _ = parse_key(name)
        if not 0 <= block < footprint.num_layers:
            raise ValueError(f"tensor {name!r}: the model has blocks 0-{footprint.num_layers - 1}")
        if dtype != "F32":
            raise ValueError(f"tensor {name!r} is {dtype}: weights travel as float32 (F32)")
        counts[block] += int(np.prod(shape, dtype=np.int64))
    wrong = [b for b, n in enumerate(counts) if n != footprint.block_params[b]]
    if wrong:
        b = wrong[0]
        raise ValueError(f"block {b} has {counts[b]} parameters, the model's has "
                         f"{footprint.block_params[b]} ({len(wrong)} block(s) differ)")


def weighted_average(names: Iterable[str], parts: Sequence[Callable[[str], np.ndarray]],
                     weights: Sequence[float]) -> dict[str, np.ndarray]:
    """name -> sum_i (w_i / W) * part_i(name) as float32, W the weights' total: fedavg's
    average, whether the parts are upload files (`WeightStore.average`) or a simulator's
    in-memory uploads (zorba_sim/fedavg_clients.py). Parts are read one tensor at a time."""
    total = sum(weights)
    if not parts or len(parts) != len(weights) or total <= 0:
        raise ValueError("averaging needs at least one upload with a positive weight "
                         f"(got {len(parts)} uploads, {len(weights)} weights, total {total})")
    averaged: dict[str, np.ndarray] = {}
    for name in sorted(names):
        # float64 sums in a fixed order: the average does not depend on arrival order.
        acc: np.ndarray | None = None
        for part, weight in zip(parts, weights, strict=True):
            tensor = part(name)
            if acc is None:
                acc = np.zeros(tensor.shape, dtype=np.float64)
            acc += (weight / total) * tensor
        assert acc is not None
        averaged[name] = acc.astype(np.float32)
    return averaged


class WeightStore:
    """Files under `<db>.weights/`: `upload-r<round>-<client>.safetensors` and `global-v<n>`."""

    def __init__(self, db_path: str | Path, *, keep_versions: bool = False,
                 max_upload_bytes: int) -> None:
        self.directory = default_weights_dir(db_path)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions
        self.max_upload_bytes = max_upload_bytes
        self.layout: dict[str, tuple[str, tuple[int, ...]]] | None = None
        """The first accepted layout; every later upload must match it exactly."""

    def upload_path(self, round_: int, client_id: str) -> Path:
        return self.directory / f"upload-r{round_}-{client_id}.safetensors"

    def has_upload(self, round_: int, client_id: str) -> bool:
        return self.upload_path(round_, client_id).exists()

    def version_file(self, version: int) -> Path | None:
        path = version_path(self.directory, version)
        return path if version > 0 and path.exists() else None

    async def receive(self, round_: int, client_id: str, chunks: AsyncIterable[bytes],
                      footprint: ModelFootprint) -> int:
        """Stream an upload to disk, check it, and keep it for the round's close."""
        final = self.upload_path(round_, client_id)
        partial = final.with_suffix(".part")
        size = 0
        try:
            with partial.open("wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise errors.too_large(
                            f"weights upload exceeds {self.max_upload_bytes} bytes")
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            try:
                layout = read_layout(partial)
                check_layout(layout, footprint)
            except (ValueError, KeyError, TypeError) as exc:
                raise errors.unprocessable("invalid_weights", f"weights upload: {exc}") from None
            if self.layout is not None and layout != self.layout:
                raise errors.unprocessable(
                    "invalid_weights", "weights upload: tensor names or shapes differ from the "
                    "other clients' (same model, same blocks expected)")
            self.layout = layout
            partial.replace(final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        return size

    def average(self, uploads: Sequence[Upload], version: int) -> Path:
        """The weighted mean of the uploads, written atomically as `version`'s file."""
        if not uploads:
            raise ValueError("averaging needs at least one upload with a positive weight")
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(safe_open(str(u.path), framework="numpy"))
                     for u in uploads]
            averaged = weighted_average(files[0].keys(), [f.get_tensor for f in files],
                                        [u.weight for u in uploads])
        final = version_path(self.directory, version)
        partial = final.with_suffix(".part")
        save_file(averaged, str(partial))
        del averaged
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        partial.replace(final)
        return final

    def discard_round(self, round_: int) -> None:
        for path in self.directory.glob(f"upload-r{round_}-*.safetensors"):
            path.unlink(missing_ok=True)

    def prune_versions(self, current: int) -> None:
        """Drop superseded versions' files unless every version is kept for evaluation."""
        if self.keep_versions:
            return
        for path in self.directory.glob("global-v*.safetensors"):
            if path != version_path(self.directory, current):
                path.unlink(missing_ok=True)
