"""Where the comparison benchmarks write docs/: one generated section of the results page and
its plots beside it. The bench (zorba_lab/compare/) composes the text and draws the figures;
only these two functions touch the files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from zorba_lab.compare.page import read_page, with_section
from zorba_lab.compare.plots import Plot, plot_path, pyplot


def write_section(results: Path, name: str, body: str) -> None:
    """Rewrite one generated section of the page at `results`, keeping the rest."""
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(with_section(read_page(results), name, body), encoding="utf-8")


def save_plots(plots: Sequence[Plot], results: Path) -> dict[str, Path]:
    """Each plot as a PNG beside the page; caption -> its file."""
    saved = {}
    for plot in plots:
        path = plot_path(results, plot.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        plot.figure.savefig(path, dpi=120)
        pyplot().close(plot.figure)
        saved[plot.caption] = path
    return saved
