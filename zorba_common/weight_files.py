"""The fedavg baseline's weight files: one format for uploads, downloads and checkpoints.

A weight file is safetensors holding every trained block's parameters in float32, keyed
`blocks.{b}.{name}` with `name` relative to block b (the names
`LoadedModel.trainable_parameters(b)` gives). Clients upload their local weights after a
round, the server averages them into the next version's global weights and serves that file
as it is; embeddings, final norm and head stay the base model's in every mode.

Torch-free on purpose: the server handles these files with numpy only.
"""

from __future__ import annotations

import re
from pathlib import Path

WEIGHTS_CONTENT_TYPE = "application/vnd.zorba.safetensors"
VERSION_HEADER = "X-Zorba-Version"
"""The alpha version whose global weights a GET /v1/weights body holds."""
_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def tensor_key(block: int, name: str) -> str:
    return f"blocks.{block}.{name}"


def parse_key(key: str) -> tuple[int, str]:
    """(block, name) of a tensor key; ValueError for a key outside the format."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise ValueError(f"tensor {key!r} is not named blocks.<block>.<parameter>")
    return int(match.group(1)), match.group(2)


def version_path(directory: Path, version: int) -> Path:
    """Where the server keeps the global weights of an alpha version."""
    return directory / f"global-v{version:06d}.safetensors"


def default_weights_dir(db_path: str | Path) -> Path:
    """The server's weight files live beside its database: `<db>.weights/`."""
    return Path(f"{db_path}.weights")
