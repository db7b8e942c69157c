"""Where a model source's tokenizer comes from: a directory, or a GGUF file checked against
its own vocabulary and cached once built (building Gemma 3's takes about a minute)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zorba_common.errors import ModelSourceError
from zorba_edge.model.gguf_tokenizer import (
    TOKENIZER_HINT,
    GGUFVocab,
    build_sentencepiece_bpe,
    require_tokenizer_matches,
)

log = logging.getLogger(__name__)

CACHE_ENV = "ZORBA_EDGE_CACHE"
BUILDER_VERSION = 1
"""Part of the cache key: bump it when the builder's output changes."""


def cache_root() -> Path:
    """$ZORBA_EDGE_CACHE, else $XDG_CACHE_HOME/zorba-edge, else ~/.cache/zorba-edge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "zorba-edge"


def load_tokenizer_dir(directory: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved with save_pretrained (tokenizer.json and its config)."""
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(f"{directory}: no usable tokenizer: {error}") from error


def _cache_dir(fingerprint: str) -> Path:
    return cache_root() / "tokenizers" / f"{fingerprint[:32]}-v{BUILDER_VERSION}"


def cached_gguf_tokenizer(fingerprint: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer built and verified earlier for the GGUF with this fingerprint, if any."""
    return load_tokenizer_dir(_cache_dir(fingerprint)) if is_gguf_tokenizer_cached(fingerprint) else None


def is_gguf_tokenizer_cached(fingerprint: str) -> bool:
    return (_cache_dir(fingerprint) / "tokenizer.json").is_file()


def gguf_tokenizer(path: Path, fingerprint: str, vocab: GGUFVocab,
                   tokenizer_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the GGUF at `path` (`vocab`, its tokenizer fields), verified against
    that vocabulary.

    SentencePiece-BPE vocabularies are built here (transformers 4.57 converts them wrongly);
    others (byte-level BPE) by transformers' converter, which reads the file itself: call it
    within `gguf_reading.reader_reused` to spare it the parse. A verified tokenizer is cached
    under the file's fingerprint (`cached_gguf_tokenizer`), so later starts skip both the
    build and the check. With `tokenizer_dir` that tokenizer is used instead, after the same
    check, and nothing is cached.
    """
    started = time.monotonic()
    log.info("reading the tokenizer of %s (once; it is cached afterwards)", path.name)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer_dir(tokenizer_dir)
    elif vocab.model == "llama":
        log.info("building the %d-piece SentencePiece tokenizer", len(vocab.tokens))
        tokenizer = build_sentencepiece_bpe(vocab)
    else:
        log.info("converting the %d-piece %s tokenizer with transformers", len(vocab.tokens),
                 vocab.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as error:
            raise ModelSourceError(
                f"{path}: transformers cannot convert the GGUF's tokenizer ({error}); "
                f"{TOKENIZER_HINT}") from error
    require_tokenizer_matches(tokenizer, vocab, str(tokenizer_dir or path))
    log.info("tokenizer ready and checked against the GGUF vocabulary (%.0f s)",
             time.monotonic() - started)
    if tokenizer_dir is None:
        cached = _cache_dir(fingerprint)
        try:
            tokenizer.save_pretrained(cached)
        except OSError as error:  # a read-only home: work on, uncached
            log.warning("could not cache the tokenizer in %s: %s", cached, error)
    return tokenizer
