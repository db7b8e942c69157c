"""Where a model source's tokenizer comes from: a directory, or a GGUF file checked against
its own vocabulary and cached once built (building Gemma 3's takes about a minute)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from zorba_edge.errors import ModelSourceError
from zorba_edge.model.gguf_tokenizer import (
    TOKENIZER_HINT,
    build_sentencepiece_bpe,
    read_gguf_vocab,
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


def gguf_tokenizer(path: Path, fingerprint: str,
                   tokenizer_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the GGUF at `path`, verified against the file's vocabulary.

    SentencePiece-BPE vocabularies are built here (transformers 4.57 converts them wrongly);
    others (byte-level BPE) by transformers' converter. A verified tokenizer is cached under
    the file's fingerprint, so later starts skip both the build and the check. With
    `tokenizer_dir` that tokenizer is used instead, after the same check.
    """
    cached = cache_root() / "tokenizers" / f"{fingerprint[:32]}-v{BUILDER_VERSION}"
    if tokenizer_dir is None and (cached / "tokenizer.json").is_file():
        return load_tokenizer_dir(cached)
    started = time.monotonic()
    log.info("reading the tokenizer of %s (once; it is cached afterwards)", path.name)
    vocab = read_gguf_vocab(path)
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
        try:
            tokenizer.save_pretrained(cached)
        except OSError as error:  # a read-only home: work on, uncached
            log.warning("could not cache the tokenizer in %s: %s", cached, error)
    return tokenizer
