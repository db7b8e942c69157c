"""A simulation's results folder and its progress display.

    base.json                 the base model's held-out accuracy and loss (the curves' point at 0)
                              and its acc_bias_floor (label offsets fitted on training examples)
    summary.json              settings, fleet, per-round records, final accuracy, virtual time,
                              forward passes, reference step time, alpha hash
    rounds.csv                one line per round (the records of summary.json)
    accuracy_time.png         held-out accuracy (95% binomial band) and losses against virtual
                              seconds (matplotlib)
    accuracy_forwards.png     the same against forward passes spent (matplotlib)
    checkpoint/               the state after the last round (`zorba-simulate --resume DIR`)

The records are `RoundRecord`s as the simulator returns them; nothing here recomputes them.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from zorba_sim.simulation import RoundRecord

SUMMARY, ROUNDS_CSV = "summary.json", "rounds.csv"
PLOTS = {"accuracy_time.png": ("virtual_time_s", "virtual time (s)"),
         "accuracy_forwards.png": ("forwards", "forward passes (all clients)")}
RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(RoundRecord))


def final_accuracy(records: Sequence[RoundRecord]) -> tuple[float | None, int | None]:
    """The latest measured held-out accuracy and the round it was measured after."""
    for record in reversed(records):
        if record.accuracy is not None:
            return record.accuracy, record.round
    return None, None


def write_json(path: Path, data: Any) -> None:
    """Atomically: a run killed mid-write leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def records_as_dicts(records: Sequence[RoundRecord]) -> list[dict[str, Any]]:
    # NaN (a round whose clients took no step) is not JSON: it becomes null.
    return [{k: (None if isinstance(v, float) and v != v else v)
             for k, v in dataclasses.asdict(r).items()} for r in records]


def write_rounds_csv(path: Path, records: Sequence[RoundRecord],
                     acc_bias_floor: float | None = None) -> None:
    """One row per round; `acc_bias_floor` (the base model's, the same on every row) stands
    beside each accuracy so that a reader of the file alone sees how much is calibration."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*RECORD_FIELDS, "acc_bias_floor"])
        writer.writeheader()
        for row in records_as_dicts(records):
            row["acc_bias_floor"] = acc_bias_floor
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, path)


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on n examples: how far the
    held-out figure may be from the model's true accuracy by the draw of the examples alone."""
    if n <= 0:
        return accuracy, accuracy
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def write_plots(out: Path, records: Sequence[RoundRecord], title: str,
                base_accuracy: float | None = None, *, base_loss: float | None = None,
                eval_examples: int | None = None) -> list[str]:
    """Per x axis, held-out accuracy (with its 95% binomial band over `eval_examples`) above
    the held-out and training losses, from the base model's point at 0 when given; an empty
    list (and no error) when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in records if r.accuracy is not None]
    trained = [r for r in records if r.train_loss is not None and r.train_loss == r.train_loss]
    written = []
    for name, (field, label) in PLOTS.items():
        fig, (acc_ax, loss_ax) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True)
        xs = [getattr(r, field) for r in measured]
        ys = [float(r.accuracy) for r in measured if r.accuracy is not None]  # the filter types it
        eval_xs, eval_ys = list(xs), [r.eval_loss for r in measured]
        if base_accuracy is not None:
            xs, ys = [0, *xs], [base_accuracy, *ys]
        if base_loss is not None:
            eval_xs, eval_ys = [0, *eval_xs], [base_loss, *eval_ys]
        acc_ax.plot(xs, ys, marker="o", label="held-out accuracy")
        if eval_examples:
            low, high = zip(*(wilson_interval(y, eval_examples) for y in ys), strict=True) if ys else ((), ())
            acc_ax.fill_between(xs, low, high, alpha=0.2, label="95% binomial band")
            acc_ax.set_title(f"{title}; {eval_examples} held-out examples")
        else:
            acc_ax.set_title(title)
        acc_ax.set_ylabel("held-out accuracy")
        acc_ax.legend(loc="lower right", fontsize="small")
        kept = [(x, y) for x, y in zip(eval_xs, eval_ys, strict=True) if y is not None]
        if kept:
            loss_ax.plot(*zip(*kept, strict=True), marker="o", label="held-out loss")
        loss_ax.plot([getattr(r, field) for r in trained], [r.train_loss for r in trained],
                     marker=".", alpha=0.7, label="training loss (clients' batches)")
        loss_ax.set_ylabel("loss (cross-entropy)")
        loss_ax.set_xlabel(label)
        loss_ax.legend(loc="upper right", fontsize="small")
        for ax in (acc_ax, loss_ax):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


# ------------------------------------------------------------------ progress


class Progress(Protocol):
    def __call__(self, record: RoundRecord) -> None: ...


def describe_record(record: RoundRecord, rounds: int) -> str:
    parts = [f"round {record.round:>4}/{rounds} {record.status:<8}",
             f"reports {record.reports}/{record.assigned}"]
    if record.dropped or record.stragglers:
        parts.append(f"dropped {record.dropped} slow {record.stragglers}")
    parts.append(f"virtual {record.virtual_time_s:,.0f} s")
    parts.append(f"forwards {record.forwards:,}")
    if record.train_loss is not None and record.train_loss == record.train_loss:
        parts.append(f"loss {record.train_loss:.4f}")
    if record.accuracy is not None:
        parts.append(f"acc {record.accuracy:.3f}")
    if record.shrunk_batches:
        parts.append(f"trust-shrunk {record.shrunk_batches}")
    if record.readout_shrunk_batches:
        parts.append(f"readout-shrunk {record.readout_shrunk_batches}")
    parts.append(f"({record.wall_s:.1f} s)")
    return "  ".join(parts)


@contextmanager
def progress_display(rounds: int, done: int, *, live: bool | None = None) -> Iterator[Progress]:
    """A rich progress bar over rounds on a terminal; one log line per round otherwise."""
    live = sys.stderr.isatty() if live is None else live
    if not live:
        def log(record: RoundRecord) -> None:
            print(f"{time.strftime('%H:%M:%S')} {describe_record(record, rounds)}", file=sys.stderr,
                  flush=True)

        yield log
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    console = Console(stderr=True)
    with RichProgress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.description}"), console=console) as bar:
        task = bar.add_task("", total=rounds, completed=done)

        def update(record: RoundRecord) -> None:
            bar.console.print(describe_record(record, rounds), highlight=False)
            bar.update(task, advance=1, description=(
                f"virtual {record.virtual_time_s:,.0f} s"
                + (f"  acc {record.accuracy:.3f}" if record.accuracy is not None else "")))

        yield update

