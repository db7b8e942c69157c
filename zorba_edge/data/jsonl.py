"""A user's own data: JSONL files, one example per line.

Classification: `{"text": "...", "label": "positive"}` (a label name of the task's template,
or its index). Generation: `{"prompt": "...", "completion": "..."}`. Other keys are ignored so
that files can carry ids or metadata. Blank lines are skipped. Every problem is a DataError
naming the file and the line, because the user has to find and fix it there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from zorba_common.errors import DataError
from zorba_edge.data.examples import ClassificationExample, GenerationExample


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; DataError on anything but JSON objects."""
    try:
        handle = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file; check the path") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from exc
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                        "each line must hold one JSON object"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
                    )
                yield number, record
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def _string(path: Path, number: int, record: dict[str, Any], key: str, *, empty_ok: bool) -> str:
    if key not in record:
        raise DataError(f"{path}:{number}: missing key {key!r} (keys present: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"{path}:{number}: {key!r} must be a string, got {type(value).__name__} {value!r:.60}"
        )
    if not empty_ok and not value.strip():
        raise DataError(f"{path}:{number}: {key!r} is empty")
    return value


def _label(path: Path, number: int, record: dict[str, Any], label_names: Sequence[str]) -> int:
    if "label" not in record:
        raise DataError(f"{path}:{number}: missing key 'label' (keys present: {sorted(record)})")
    value = record["label"]
    # bool is an int in Python, but `true` as a label is almost surely a mistake in the file.
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(label_names):
            return value
        raise DataError(
            f"{path}:{number}: label index {value} is out of range; this task has "
            f"{len(label_names)} labels {list(label_names)} (indices 0..{len(label_names) - 1})"
        )
    if isinstance(value, str):
        if value in label_names:
            return list(label_names).index(value)
        raise DataError(
            f"{path}:{number}: unknown label {value!r}; this task's labels are {list(label_names)}"
        )
    raise DataError(
        f"{path}:{number}: 'label' must be a label name or index, got {type(value).__name__}"
    )


def load_classification_jsonl(
    path: str | Path, label_names: Sequence[str]
) -> list[ClassificationExample]:
    """Read `{"text", "label"}` lines; labels by name (from `label_names`) or by index."""
    path = Path(path)
    examples = [
        ClassificationExample(
            text=_string(path, number, record, "text", empty_ok=False),
            label=_label(path, number, record, label_names),
        )
        for number, record in _records(path)
    ]
    if not examples:
        raise DataError(f"{path}: the file holds no examples; add one JSON object per line")
    return examples


def load_generation_jsonl(path: str | Path) -> list[GenerationExample]:
    """Read `{"prompt", "completion"}` lines; the prompt may be empty, the completion not."""
    path = Path(path)
    examples = [
        GenerationExample(
            prompt=_string(path, number, record, "prompt", empty_ok=True),
            completion=_string(path, number, record, "completion", empty_ok=False),
        )
        for number, record in _records(path)
    ]
    if not examples:
        raise DataError(f"{path}: the file holds no examples; add one JSON object per line")
    return examples


def jsonl_task_kind(path: str | Path) -> str:
    """'classification' or 'generation', from the keys of the file's first example."""
    path = Path(path)
    for number, record in _records(path):
        if "text" in record and "label" in record:
            return "classification"
        if "prompt" in record and "completion" in record:
            return "generation"
        raise DataError(
            f"{path}:{number}: cannot tell the task from keys {sorted(record)}; use "
            '{"text", "label"} for classification or {"prompt", "completion"} for generation'
        )
    raise DataError(f"{path}: the file holds no examples; add one JSON object per line")
