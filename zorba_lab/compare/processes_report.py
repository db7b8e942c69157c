"""The pure half of benchmarks/compare.py: figures per run in, comparison and report out.

No federation, model or clock here: aggregation over repetitions, the equal-wall-time pick,
the ratios against fedavg, the targets, the markdown page and its plots. compare.py fills
`ModeRun`s from real runs; the tests fill them by hand.

Equal wall time: in each repetition, T is the shortest training time among the modes (last
applied round's close minus the first round's opening, on the server's clock). Each mode's
accuracy at T is that of its last evaluated version whose round closed at or before T (the
base model's when none did); the figure reported is the mean over repetitions.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zorba_common.run_defaults import FEDAVG, FEDZO_FULL, RUN_MODES, ZORBA, ZORBA_UNIFORM
from zorba_lab.compare.plots import Plot, pyplot

TARGET_PEAK_RATIO = 0.4
"""Largest client peak of zorba / of fedavg."""
TARGET_BYTES_RATIO = 1e-4
"""(up + down) bytes per client per round of zorba / of fedavg."""
DISCUSSION = "## Discussion"
DISCUSSION_PLACEHOLDER = (
    "_Placeholder written by benchmarks/compare.py because this page had no discussion yet. "
    "Replace it with what the figures above show (and do not show); the generator keeps this "
    "section, from its heading to the end of the page, as it is on every later run._\n")
MIB = 2**20


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class AccuracyPoint:
    version: int
    round: int
    """The round that produced the version (0: the base model)."""
    wall_s: float
    """When that round closed, in seconds since the first round opened (0 for the base)."""
    accuracy: float
    loss: float


@dataclass(frozen=True)
class ClientResult:
    name: str
    budget_bytes: int
    peak_bytes: int
    """Largest peak the client reported over its rounds (0: it reported none)."""
    rounds_reported: int
    bytes_up_per_round: float
    bytes_down_per_round: float
    blocks_per_round: tuple[int, ...] = ()
    excluded: str | None = None
    """Why it took no part (it reported no round); None when it did."""


@dataclass(frozen=True)
class ModeRun:
    """One mode in one repetition."""

    mode: str
    rep: int
    points: tuple[AccuracyPoint, ...]
    """The base model and the evaluated versions, in version order."""
    clients: tuple[ClientResult, ...]
    train_s: float
    """Last applied round's close minus the first round's opening (0: nothing applied)."""
    steps: int
    rounds_applied: int
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds spent around the training (federation start-up, replay load and evaluation)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(rec: Mapping[str, Any]) -> ModeRun:
        """Back from `as_dict` (runs.json), to rewrite a report without training again."""
        return ModeRun(
            mode=rec["mode"], rep=rec["rep"],
            points=tuple(AccuracyPoint(**p) for p in rec["points"]),
            clients=tuple(ClientResult(**{**c, "blocks_per_round": tuple(c["blocks_per_round"])})
                          for c in rec["clients"]),
            train_s=rec["train_s"], steps=rec["steps"], rounds_applied=rec["rounds_applied"],
            timings=dict(rec["timings"]))


# ---------------------------------------------------------------------------- picking


def accuracy_at_time(points: Sequence[AccuracyPoint], t: float) -> AccuracyPoint:
    """The last evaluated version whose round closed at or before `t` (the base at worst)."""
    return max((p for p in points if p.version == 0 or p.wall_s <= t), key=lambda p: p.version)


def accuracy_at_version(points: Sequence[AccuracyPoint], version: int) -> AccuracyPoint:
    """The last evaluated version at or before `version`."""
    return max((p for p in points if p.version <= version), key=lambda p: p.version)


def equal_wall_time(runs: Iterable[ModeRun]) -> float:
    """T: the shortest training time among runs that applied a round (of one repetition).

    A run that applied nothing has no training time to compare and would drag T to 0.
    """
    times = [r.train_s for r in runs if r.rounds_applied > 0]
    return min(times) if times else 0.0


def equal_rounds(runs: Iterable[ModeRun]) -> int:
    """The fewest applied rounds among the runs (all equal when every mode ran to the end)."""
    return min((r.rounds_applied for r in runs), default=0)


# ---------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float
    """Sample standard deviation over repetitions (0 with one)."""
    min: float
    max: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return Spread(statistics.fmean(values), std, min(values), max(values), len(values))

    def show(self, digits: int = 4) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return (f"{self.mean:.{digits}f} ± {self.std:.{digits}f} "
                f"[{self.min:.{digits}f}–{self.max:.{digits}f}]")


@dataclass(frozen=True)
class ModeSummary:
    mode: str
    reps: int
    acc_equal_time: Spread
    acc_equal_rounds: Spread
    equal_time_s: tuple[float, ...]
    """T of each repetition."""
    largest_peak_bytes: int
    """Largest peak any client reported in any repetition."""
    clients: tuple[ClientResult, ...]
    """Per client: its largest peak over repetitions; bytes per round averaged over them."""
    bytes_up_per_round: float
    """Mean over the clients that took part, then over repetitions."""
    bytes_down_per_round: float
    steps: float
    train_s: float
    rounds_applied: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _by_rep(runs: Iterable[ModeRun]) -> dict[int, list[ModeRun]]:
    reps: dict[int, list[ModeRun]] = {}
    for run in runs:
        reps.setdefault(run.rep, []).append(run)
    return reps


def _taking_part(clients: Iterable[ClientResult]) -> list[ClientResult]:
    return [c for c in clients if c.excluded is None and c.rounds_reported > 0]


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _merge_clients(runs: Sequence[ModeRun]) -> tuple[ClientResult, ...]:
    """One row per client over repetitions: largest peak, mean bytes, first exclusion reason."""
    names = sorted({c.name for r in runs for c in r.clients})
    merged = []
    for name in names:
        rows = [c for r in runs for c in r.clients if c.name == name]
        part = _taking_part(rows)
        reasons = [c.excluded for c in rows if c.excluded is not None]
        merged.append(ClientResult(
            name=name, budget_bytes=rows[0].budget_bytes,
            peak_bytes=max(c.peak_bytes for c in rows),
            rounds_reported=round(_mean([c.rounds_reported for c in rows])),
            bytes_up_per_round=_mean([c.bytes_up_per_round for c in part]),
            bytes_down_per_round=_mean([c.bytes_down_per_round for c in part]),
            blocks_per_round=tuple(sorted({b for c in rows for b in c.blocks_per_round})),
            excluded=(f"{reasons[0]} ({len(reasons)}/{len(rows)} reps)"
                      if reasons and len(rows) > 1 else (reasons[0] if reasons else None))))
    return tuple(merged)


def summarize(runs: Sequence[ModeRun]) -> dict[str, ModeSummary]:
    """Per mode (in RUN_MODES order): accuracy at equal wall time and rounds, peaks, bytes."""
    reps = _by_rep(runs)
    picks: dict[str, dict[str, list[float]]] = {}
    times: dict[str, list[float]] = {}
    for rep_runs in reps.values():
        t, rounds = equal_wall_time(rep_runs), equal_rounds(rep_runs)
        for run in rep_runs:
            pick = picks.setdefault(run.mode, {"time": [], "rounds": []})
            pick["time"].append(accuracy_at_time(run.points, t).accuracy)
            pick["rounds"].append(accuracy_at_version(run.points, rounds).accuracy)
            times.setdefault(run.mode, []).append(t)
    out = {}
    for mode in sorted(picks, key=_mode_order):
        mode_runs = sorted((r for r in runs if r.mode == mode), key=lambda r: r.rep)
        per_rep_up, per_rep_down = [], []
        for r in mode_runs:
            part = _taking_part(r.clients)
            if part:
                per_rep_up.append(_mean([c.bytes_up_per_round for c in part]))
                per_rep_down.append(_mean([c.bytes_down_per_round for c in part]))
        out[mode] = ModeSummary(
            mode=mode, reps=len(mode_runs),
            acc_equal_time=Spread.of(picks[mode]["time"]),
            acc_equal_rounds=Spread.of(picks[mode]["rounds"]),
            equal_time_s=tuple(times[mode]),
            largest_peak_bytes=max((c.peak_bytes for r in mode_runs for c in r.clients), default=0),
            clients=_merge_clients(mode_runs),
            bytes_up_per_round=_mean(per_rep_up), bytes_down_per_round=_mean(per_rep_down),
            steps=_mean([r.steps for r in mode_runs]), train_s=_mean([r.train_s for r in mode_runs]),
            rounds_applied=_mean([r.rounds_applied for r in mode_runs]))
    return out


def _mode_order(mode: str) -> int:
    return RUN_MODES.index(mode) if mode in RUN_MODES else len(RUN_MODES)


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den; None when either was not measured (a mode not run, or nothing reported)."""
    if not num or not den:
        return None
    return num / den


def _traffic(summary: ModeSummary) -> float:
    return summary.bytes_up_per_round + summary.bytes_down_per_round


def ratios(summaries: Mapping[str, ModeSummary]) -> dict[str, float | None]:
    """zorba over fedavg; None where either mode was not run (never invented)."""
    zorba, fedavg = summaries.get(ZORBA), summaries.get(FEDAVG)
    if zorba is None or fedavg is None:
        return {"peak_ratio_zorba_over_fedavg": None, "bytes_ratio_zorba_over_fedavg": None}
    return {"peak_ratio_zorba_over_fedavg": _ratio(zorba.largest_peak_bytes,
                                                   fedavg.largest_peak_bytes),
            "bytes_ratio_zorba_over_fedavg": _ratio(_traffic(zorba), _traffic(fedavg))}


def acc_key(mode: str) -> str:
    return "acc_" + mode.replace("-", "_")


def accuracies(summaries: Mapping[str, ModeSummary]) -> dict[str, Any]:
    """acc_<mode> (equal wall time), its spread, and acc_<mode>_at_equal_rounds; None if not run."""
    out: dict[str, Any] = {}
    for mode in RUN_MODES:
        s = summaries.get(mode)
        key = acc_key(mode)
        out[key] = None if s is None else s.acc_equal_time.mean
        out[f"{key}_spread"] = None if s is None else asdict(s.acc_equal_time)
        out[f"{key}_at_equal_rounds"] = None if s is None else s.acc_equal_rounds.mean
        out[f"{key}_at_equal_rounds_spread"] = None if s is None else asdict(s.acc_equal_rounds)
    return out


def targets_met(figures: Mapping[str, Any]) -> dict[str, bool | None]:
    """The issue's targets; None where a figure they need was not measured."""
    peak, data = figures["peak_ratio_zorba_over_fedavg"], figures["bytes_ratio_zorba_over_fedavg"]
    zorba = figures[acc_key(ZORBA)]

    def at_least(other: str) -> bool | None:
        value = figures[acc_key(other)]
        return None if zorba is None or value is None else zorba >= value

    return {
        f"peak_ratio<={TARGET_PEAK_RATIO}": None if peak is None else peak <= TARGET_PEAK_RATIO,
        f"bytes_ratio<={TARGET_BYTES_RATIO:g}": None if data is None else data <= TARGET_BYTES_RATIO,
        "acc_zorba>=acc_fedzo_full": at_least(FEDZO_FULL),
        "acc_zorba>=acc_zorba_uniform": at_least(ZORBA_UNIFORM),
    }


def headline(summaries: Mapping[str, ModeSummary]) -> dict[str, Any]:
    """The issue's figures: the ratios, acc_<mode> with spreads, and targets_met."""
    figures: dict[str, Any] = {**ratios(summaries), **accuracies(summaries)}
    figures["targets_met"] = targets_met(figures)
    return figures


# ---------------------------------------------------------------------------- per round


@dataclass(frozen=True)
class RoundCell:
    accuracy: Spread
    wall_s: float
    """Mean over repetitions of when the version's round closed."""


def per_version(runs: Sequence[ModeRun]) -> dict[str, dict[int, RoundCell]]:
    """mode -> version -> accuracy over repetitions, for the table and the plots."""
    out: dict[str, dict[int, RoundCell]] = {}
    for mode in sorted({r.mode for r in runs}, key=_mode_order):
        points: dict[int, list[AccuracyPoint]] = {}
        for r in runs:
            if r.mode == mode:
                for p in r.points:
                    points.setdefault(p.version, []).append(p)
        out[mode] = {v: RoundCell(Spread.of([p.accuracy for p in ps]), _mean([p.wall_s for p in ps]))
                     for v, ps in sorted(points.items())}
    return out


# ---------------------------------------------------------------------------- markdown


def _size(n: float) -> str:
    return f"{n / MIB:.0f} MiB" if n else "-"


def _bytes(n: float) -> str:
    if n >= 10 * MIB:
        return f"{n / MIB:,.1f} MiB"
    return f"{n:,.0f} B"


def _clients_cell(clients: Sequence[ClientResult], what: str) -> str:
    if what == "peak/budget":
        return ", ".join(f"{c.name} {c.peak_bytes / c.budget_bytes:.2f}" for c in clients
                         if c.peak_bytes)
    excluded = [f"{c.name} ({c.excluded})" for c in clients if c.excluded is not None]
    return "; ".join(excluded) if excluded else "none"


def mode_table(summaries: Mapping[str, ModeSummary]) -> list[str]:
    lines = [
        "| mode | accuracy at equal rounds | accuracy at equal wall time | largest peak "
        "| peak / budget per client | excluded clients | up per client per round "
        "| down per client per round | steps | training s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries.values():
        lines.append(
            f"| {s.mode} | {s.acc_equal_rounds.show()} | {s.acc_equal_time.show()} "
            f"| {_size(s.largest_peak_bytes)} | {_clients_cell(s.clients, 'peak/budget')} "
            f"| {_clients_cell(s.clients, 'excluded')} | {_bytes(s.bytes_up_per_round)} "
            f"| {_bytes(s.bytes_down_per_round)} | {s.steps:.0f} | {s.train_s:.0f} |")
    return lines


def round_table(table: Mapping[str, Mapping[int, RoundCell]]) -> list[str]:
    modes = list(table)
    versions = sorted({v for cells in table.values() for v in cells})
    lines = ["| version | " + " | ".join(f"{m}: accuracy (s)" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for v in versions:
        cells = []
        for m in modes:
            cell = table[m].get(v)
            cells.append("-" if cell is None else f"{cell.accuracy.mean:.4f} ({cell.wall_s:.0f})")
        lines.append(f"| {'base' if v == 0 else v} | " + " | ".join(cells) + " |")
    return lines


def _show(value: float | None, fmt: str) -> str:
    return "not measured" if value is None else format(value, fmt)


def _met(value: bool | None) -> str:
    return {None: "-", True: "yes", False: "**no**"}[value]


def targets_table(figures: Mapping[str, Any], met: Mapping[str, bool | None]) -> list[str]:
    names = list(met)
    zorba = figures[acc_key(ZORBA)]
    return [
        "| figure | measured | target | met |",
        "|---|---|---|---|",
        f"| largest client peak, zorba / fedavg | "
        f"{_show(figures['peak_ratio_zorba_over_fedavg'], '.3f')} | <= {TARGET_PEAK_RATIO} "
        f"| {_met(met[names[0]])} |",
        f"| bytes (up + down) per client per round, zorba / fedavg | "
        f"{_show(figures['bytes_ratio_zorba_over_fedavg'], '.2e')} | <= {TARGET_BYTES_RATIO:g} "
        f"| {_met(met[names[1]])} |",
        f"| accuracy at equal wall time, zorba vs fedzo-full | {_show(zorba, '.4f')} vs "
        f"{_show(figures[acc_key(FEDZO_FULL)], '.4f')} | zorba >= | {_met(met[names[2]])} |",
        f"| accuracy at equal wall time, zorba vs zorba-uniform | {_show(zorba, '.4f')} vs "
        f"{_show(figures[acc_key(ZORBA_UNIFORM)], '.4f')} | zorba >= | {_met(met[names[3]])} |",
    ]


@dataclass(frozen=True)
class Page:
    """Everything the results page shows besides the tables computed from the runs."""

    setting: Mapping[str, Any]
    command: str
    machine: str
    date: str
    plots: Mapping[str, Path] = field(default_factory=dict)
    """caption -> PNG path (written beside the page)."""
    failures: tuple[str, ...] = ()
    """Runs that did not finish (left out of every figure)."""


def markdown(runs: Sequence[ModeRun], page: Page, results_path: Path) -> str:
    """The generated part of docs/results.md (everything above the discussion)."""
    summaries = summarize(runs)
    figures = headline(summaries)
    met = figures["targets_met"]
    setting = dict(page.setting)
    kind = setting.pop("kind", "full")
    lines = [
        "# ZorBA against its baselines, measured",
        "",
        f"Generated by `benchmarks/compare.py` on {page.date} ({page.machine}). Everything above "
        f"\"{DISCUSSION[3:]}\" is rewritten on each run.",
        "",
        "## Setting",
        "",
        f"- setting: **{kind}**; command: `{page.command}`",
        *(f"- {k}: {v}" for k, v in setting.items()),
        "- learning rates were **not tuned** for any mode: the zeroth-order modes use the "
        "quickstart's, fedavg (AdamW) a conventional fine-tuning rate.",
        "- accuracy is replayed after the run from the server's record (alpha deltas, or "
        "fedavg's weight files) with every block in fp32, on the same held-out reviews for "
        "every mode of a repetition; equal wall time: per repetition, T = the shortest "
        "training time among the modes, and each mode's last version closed by T.",
        *(f"- **run failed, left out of every figure**: {f}" for f in page.failures),
        "",
        "## Per mode",
        "",
        "Accuracy: mean ± sample std [min–max] over repetitions. Peaks: the largest peak each "
        "client measured and reported. Bytes: HTTP bodies per client per round, counted by a "
        "proxy on each client's wire, mean over the clients that took part.",
        "",
        *mode_table(summaries),
        "",
        "## Targets",
        "",
        *targets_table(figures, met),
        "",
        "## Accuracy per round",
        "",
        "Held-out accuracy after each evaluated version (mean over repetitions), with the "
        "seconds since the first round opened at which its round closed.",
        "",
        *round_table(per_version(runs)),
        "",
    ]
    if page.plots:
        lines += ["## Plots", ""]
        for caption, path in page.plots.items():
            lines += [f"![{caption}]({relative_link(path, results_path)})", ""]
    return "\n".join(lines)


def relative_link(path: Path, results_path: Path) -> str:
    """`path` as a link from the page at `results_path` (absolute when not below its folder)."""
    try:
        return str(path.resolve().relative_to(results_path.resolve().parent))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------- plots


def plots(runs: Sequence[ModeRun]) -> list[Plot]:
    """Accuracy against rounds and wall time, and the peaks against budgets; empty when
    matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return []
    table = per_version(runs)
    out = []
    for name, x_of, xlabel in (("accuracy_rounds", lambda v, _c: v, "applied rounds (version)"),
                               ("accuracy_time", lambda _v, c: c.wall_s,
                                "seconds since the first round opened (mean over reps)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode, cells in table.items():
            xs = [x_of(v, c) for v, c in cells.items()]
            line, = ax.plot(xs, [c.accuracy.mean for c in cells.values()], marker="o", label=mode)
            ax.fill_between(xs, [c.accuracy.min for c in cells.values()],
                            [c.accuracy.max for c in cells.values()], alpha=0.2,
                            color=line.get_color())
        if name == "accuracy_time":
            t = _mean([t for s in summarize(runs).values() for t in s.equal_time_s])
            ax.axvline(t, color="grey", linestyle=":", label=f"equal wall time T ({t:.0f} s)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (mean, min-max band over reps)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(Plot(f"accuracy vs {'round' if name == 'accuracy_rounds' else 'wall time'}",
                        name, fig))
    out.append(Plot("peak memory per client and mode, budget marked", "peaks",
                    _plot_peaks(plt, summarize(runs))))
    return out


def _plot_peaks(plt: Any, summaries: Mapping[str, ModeSummary]) -> Any:
    modes = list(summaries)
    names = sorted({c.name for s in summaries.values() for c in s.clients})
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, mode in enumerate(modes):
        peaks = {c.name: c.peak_bytes / MIB for c in summaries[mode].clients}
        ax.bar([j + (i - (len(modes) - 1) / 2) * width for j in range(len(names))],
               [peaks.get(n, 0.0) for n in names], width, label=mode)
    budgets = {c.name: c.budget_bytes / MIB for s in summaries.values() for c in s.clients}
    for j, name in enumerate(names):
        ax.hlines(budgets[name], j - 0.45, j + 0.45, colors="black", linestyles="--",
                  label="budget" if j == 0 else None)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("largest reported peak (MiB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
