"""Where a run of the simulator, the comparison or the quickstart writes its results."""

from __future__ import annotations

import time
from pathlib import Path


def new_run_dir(prefix: str, parent: Path = Path("runs")) -> Path:
    """A fresh folder `parent/prefix-<date>-<time>`, made here and only here: two runs started in
    the same second (two jobs launched together) get `...-2`, `...-3` rather than one folder,
    whose checkpoints they would overwrite under each other."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        candidate = parent / (f"{prefix}-{stamp}" if attempt == 1 else f"{prefix}-{stamp}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate.resolve()
    raise FileExistsError(f"{parent}: 999 run folders named {prefix}-{stamp}-* exist already")
