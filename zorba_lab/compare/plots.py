"""A plot for the results page: the figure and the name of its file beside the page. The bench
draws them; the benchmark that made the figures saves them (benchmarks/results_page.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plot:
    """A figure for the page: its caption, and the name its file takes beside the page."""

    caption: str
    name: str
    figure: Any
    """A matplotlib Figure; the benchmark saves it (`plot_path`) and closes it."""


def plot_path(results_path: Path, name: str) -> Path:
    """Beside the page: docs/results.md -> docs/results_<name>.png."""
    return results_path.parent / f"{results_path.stem}_{name}.png"


def pyplot() -> Any:
    """matplotlib.pyplot without a display (a server, CI), or None when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
