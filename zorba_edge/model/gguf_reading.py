"""One parse of a GGUF file's metadata per open, shared with transformers' GGUF readers.

Parsing a GGUF's metadata (`gguf.GGUFReader`) walks every key and every array element;
Gemma 3's 262k-piece vocabulary makes that about 10 s of Python. Opening a model needs the
metadata three times: transformers' config reader (`load_gguf_checkpoint`), the tensor table
and the tokenizer's vocabulary; transformers' byte-level BPE converter reads it once more.
transformers builds its own reader from the path, with no way to pass one in, so
`reader_reused` lets those calls have the reader already parsed: for the length of the
block, the name they look up (`gguf.GGUFReader`) answers with it for that one file (any
other file is parsed as usual). It swaps a module attribute, so the swap runs under a lock:
two opens in one process (a simulation, the tests) cannot catch each other's swap.
Where a transformers version binds the name elsewhere, its calls parse again: slower, never
wrong.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SWAP_LOCK = threading.RLock()


def parse_metadata(path: Path) -> Any:
    """The file's metadata and tensor table (`gguf.GGUFReader`), parsed once.

    The reader memory-maps the file and holds a numpy view per array element (about a
    million for Gemma 3): keep what you need from it and drop it."""
    from gguf import GGUFReader

    return GGUFReader(path)


@contextlib.contextmanager
def reader_reused(reader: Any, path: Path) -> Iterator[None]:
    """Within the block, `gguf.GGUFReader(path)` gives `reader` instead of parsing again."""
    import gguf

    target = Path(path).resolve()
    with _SWAP_LOCK:
        original = gguf.GGUFReader

        def reuse(spec: Any, *args: Any, **kwargs: Any) -> Any:
            if not args and not kwargs and Path(spec).resolve() == target:
                return reader
            return original(spec, *args, **kwargs)

        gguf.GGUFReader = reuse  # type: ignore[misc, assignment]  # a function for the class
        try:
            yield
        finally:
            gguf.GGUFReader = original  # type: ignore[misc]


def transformers_config(reader: Any, path: Path) -> dict[str, Any]:
    """transformers' own reading of the GGUF's config (names, defaults, per-model fixes),
    from the reader already parsed. ValueError for an architecture it does not support."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with reader_reused(reader, path):
        return dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
