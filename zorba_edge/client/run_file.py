"""A run's result as a small file a person can share: `zorba-edge apply` turns it back into a
checkpoint or a GGUF on any machine that holds the base model.

The fine-tuned model is base + alpha (docs/design.md §1), and alpha with the run seed is all
that a machine holding the base needs to rebuild it, bit for bit as `export` would. So the
file holds the base model's fingerprint (checked before anything is written), the run seed,
the pool size, the coefficient table (its non-zero entries, as exact decimal float64), and
the task's prompt template and labels, without which the model's answers cannot be read.
JSON, so that it can be read, diffed and mailed; a few KB for a quickstart run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zorba_common.errors import ModelSourceError
from zorba_edge.client.errors import UsageError
from zorba_edge.data.templates import PromptTemplate
from zorba_edge.engine.coefficients import CoefficientTable

FORMAT = "zorba-run/1"


@dataclass(frozen=True)
class RunFile:
    run_id: str
    base_fingerprint: str
    seed: int
    table: CoefficientTable
    template: PromptTemplate
    base_name: str = ""
    """The base model's file or directory name where it was exported: a hint for people."""

    def to_dict(self) -> dict[str, Any]:
        ks, bs = np.nonzero(self.table.values)
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "base_model": {"fingerprint": self.base_fingerprint, "name": self.base_name},
            "seed": self.seed,
            "pool_size": self.table.pool_size,
            "num_blocks": self.table.num_blocks,
            "alpha_version": self.table.version,
            # [k, block, alpha]: repr of a float64 reads back to the same float64.
            "alpha": [[int(k), int(b), float(self.table.values[k, b])] for k, b in zip(ks, bs, strict=True)],
            "task": {"label_names": list(self.template.label_names),
                     "label_words": list(self.template.label_words),
                     "prefix": self.template.prefix, "suffix": self.template.suffix},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the run file") -> RunFile:
        if data.get("format") != FORMAT:
            raise UsageError(f"{where} is not a zorba-edge run file (format {data.get('format')!r}, "
                             f"expected {FORMAT!r})")
        try:
            values = np.zeros((int(data["pool_size"]), int(data["num_blocks"])), dtype=np.float64)
            for k, b, alpha in data["alpha"]:
                values[int(k), int(b)] = float(alpha)
            task = data["task"]
            return cls(
                run_id=str(data["run_id"]),
                base_fingerprint=str(data["base_model"]["fingerprint"]),
                base_name=str(data["base_model"].get("name", "")),
                seed=int(data["seed"]),
                table=CoefficientTable(values.shape[0], values.shape[1], values, int(data["alpha_version"])),
                template=PromptTemplate(tuple(task["label_names"]), tuple(task["label_words"]),
                                        suffix=str(task.get("suffix", "")),
                                        prefix=str(task.get("prefix", ""))),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UsageError(f"{where} is damaged: {type(exc).__name__}: {exc}") from None

    def check_base(self, fingerprint: str, model: str) -> None:
        """ModelSourceError unless `fingerprint` is the run's base model."""
        if fingerprint != self.base_fingerprint:
            hint = f" ({self.base_name})" if self.base_name else ""
            raise ModelSourceError(
                f"{model} is not this run's base model: its fingerprint is {fingerprint[:16]}..., the "
                f"run was trained on {self.base_fingerprint[:16]}...{hint}. Pass the run's base with --model")


def write_run_file(run: RunFile, path: str | Path) -> Path:
    out = Path(path).expanduser()
    if out.exists():
        raise UsageError(f"{out} exists: choose a new file name for the run file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run.to_dict(), indent=1) + "\n")
    return out


def read_run_file(path: str | Path) -> RunFile:
    source = Path(path).expanduser()
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise UsageError(f"{source}: no such run file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{source} is not a zorba-edge run file: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{source} is not a zorba-edge run file")
    return RunFile.from_dict(data, str(source))
