"""A GGUF file's tokenizer: built from the file's own vocabulary, and checked against it.

A GGUF holds its tokenizer as plain lists (`tokenizer.ggml.tokens`, `scores`, `token_type`,
`merges`) plus a few flags. transformers converts them to a fast tokenizer, but its 4.57
converter gets SentencePiece-BPE vocabularies (`tokenizer.ggml.model == "llama"`: Llama 2,
Gemma) wrong: it splits Gemma 3 text into near-character pieces (`' great'` -> `▁g re at`)
although the vocabulary holds the whole word, and transformers 5's converter, which is right,
takes over a minute for Gemma's 262k pieces. So:

- `build_sentencepiece_bpe` builds that kind with the `tokenizers` library directly: a BPE
  whose merges are every split of a normal piece into two normal pieces, ranked by the
  merged piece's score (SentencePiece's own order), byte fallback, control tokens special,
  user-defined pieces matched whole, a prefix space only where the file says to add one.
- `check_tokenizer` verifies any tokenizer against the file: words the vocabulary holds
  whole must come out as that one token. A tokenizer that fails is refused, with the way
  out (`--tokenizer DIR`), rather than training the model on text it never saw split so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from zorba_common.errors import ModelSourceError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
"""llama.cpp's token types (`tokenizer.ggml.token_type`)."""

SPIECE_SPACE = "▁"
_WORD = re.compile(r" ?[A-Za-z]{3,}")
MIN_WHOLE_FRACTION = 0.9
"""Share of sampled whole-word pieces that must tokenise to themselves. A right tokenizer
keeps nearly all (BPE may reach a rare piece by another path); a wrong one keeps few."""
TOKENIZER_HINT = (
    "pass --tokenizer DIR with a directory holding this model's tokenizer.json (for example "
    "the tokenizer files of the model's original Hugging Face repository)"
)


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer fields of a GGUF file."""

    model: str
    """`llama` (SentencePiece BPE), `gpt2` (byte-level BPE), ..."""
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_space_prefix: bool

    def text_of(self, token_id: int) -> str | None:
        """The text a normal piece stands for, or None where the model's encoding is unknown."""
        piece = self.tokens[token_id]
        if self.model == "llama":
            return piece.replace(SPIECE_SPACE, " ")
        if self.model == "gpt2":
            decoder = _byte_decoder()
            try:
                return bytes(decoder[c] for c in piece).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                return None
        return None

    def whole_words(self, limit: int = 400) -> list[tuple[str, int]]:
        """Up to `limit` (text, id) pairs of plain words the vocabulary holds as one piece,
        evenly spread over the vocabulary (frequent and rare pieces alike)."""
        found = []
        for token_id, kind in enumerate(self.token_types):
            if kind != NORMAL:
                continue
            text = self.text_of(token_id)
            if text is not None and _WORD.fullmatch(text):
                found.append((text, token_id))
        step = max(1, len(found) // limit)
        return found[::step][:limit]


def _field(reader: object, name: str) -> list[np.ndarray] | None:
    field = reader.fields.get(name)  # type: ignore[attr-defined]
    if field is None:
        return None
    return [field.parts[i] for i in field.data]


def _scalar(reader: object, name: str) -> object | None:
    parts = _field(reader, name)
    if not parts:
        return None
    return parts[0].tolist()[0]


def read_gguf_vocab(path: str | Path) -> GGUFVocab:
    """The tokenizer fields of the GGUF at `path`; ModelSourceError when it holds none."""
    from zorba_edge.model.gguf_reading import parse_metadata

    return vocab_from_reader(parse_metadata(Path(path)), path)


def vocab_from_reader(reader: object, origin: str | Path) -> GGUFVocab:
    """The tokenizer fields of a parsed GGUF (`gguf.GGUFReader`); `origin` names it in errors."""
    model_parts = _field(reader, "tokenizer.ggml.model")
    token_parts = _field(reader, "tokenizer.ggml.tokens")
    if not model_parts or not token_parts:
        raise ModelSourceError(f"{origin}: the GGUF holds no tokenizer; {TOKENIZER_HINT}")
    tokens = tuple(bytes(p).decode("utf-8", errors="replace") for p in token_parts)
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")

    def token_id(name: str) -> int | None:
        value = _scalar(reader, f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)  # type: ignore[call-overload]

    add_bos = _scalar(reader, "tokenizer.ggml.add_bos_token")
    add_space = _scalar(reader, "tokenizer.ggml.add_space_prefix")
    model = bytes(model_parts[0]).decode()
    return GGUFVocab(
        model=model,
        tokens=tokens,
        token_types=tuple(int(t[0]) for t in types) if types else (NORMAL,) * len(tokens),
        scores=tuple(float(s[0]) for s in scores) if scores else None,
        bos_id=token_id("bos"),
        eos_id=token_id("eos"),
        unk_id=token_id("unknown"),
        pad_id=token_id("padding"),
        add_bos=bool(add_bos) if add_bos is not None else model == "llama",
        # SentencePiece adds the prefix space unless told not to (llama.cpp's default too).
        add_space_prefix=bool(add_space) if add_space is not None else model == "llama",
    )


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (the inverse of bytes_to_unicode)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def sentencepiece_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece-BPE vocabulary, highest-scoring merged piece first.

    SentencePiece BPE keeps no merge list: a piece is formed from two smaller pieces, and
    pieces of higher score are formed first. Every split of a normal piece into two normal
    pieces is therefore a merge, ranked by the merged piece's score (ties: lower id first).
    """
    if vocab.scores is None:
        raise ModelSourceError("a SentencePiece vocabulary without scores cannot be merged")
    normal = {
        piece: i for i, piece in enumerate(vocab.tokens) if vocab.token_types[i] == NORMAL
    }
    ranked = []
    for piece, merged_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-vocab.scores[merged_id], merged_id, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_sentencepiece_bpe(vocab: GGUFVocab) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to the SentencePiece-BPE model the vocabulary comes from."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pieces = {piece: i for i, piece in enumerate(vocab.tokens)}
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    bpe = models.BPE(
        vocab=pieces, merges=sentencepiece_merges(vocab), unk_token=unk, fuse_unk=True,
        byte_fallback=any(t == BYTE for t in vocab.token_types),
    )
    tokenizer = Tokenizer(bpe)
    replace = normalizers.Replace(" ", SPIECE_SPACE)
    decoding = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace])
        decoding.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(decoding)
    # SentencePiece matches control and user-defined pieces whole, before any merging.
    tokenizer.add_special_tokens([
        AddedToken(p, special=True, normalized=False)
        for p, t in zip(vocab.tokens, vocab.token_types, strict=True) if t in (CONTROL, UNKNOWN)
    ])
    tokenizer.add_tokens([
        AddedToken(p, special=False, normalized=False)
        for p, t in zip(vocab.tokens, vocab.token_types, strict=True) if t == USER_DEFINED
    ])
    bos = vocab.tokens[vocab.bos_id] if vocab.bos_id is not None else None
    if vocab.add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)]
        )

    def name(token_id: int | None) -> str | None:
        return vocab.tokens[token_id] if token_id is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=name(vocab.eos_id),
        unk_token=unk, pad_token=name(vocab.pad_id), add_bos_token=vocab.add_bos,
        add_eos_token=False, clean_up_tokenization_spaces=False,
    )


@dataclass(frozen=True)
class TokenizerCheck:
    """How a tokenizer splits the words its model's vocabulary holds whole."""

    checked: int
    whole: int
    broken: tuple[tuple[str, tuple[str, ...]], ...]
    """Up to five (word, pieces it came out as) that should have been one piece."""

    @property
    def whole_fraction(self) -> float:
        return self.whole / self.checked if self.checked else 1.0

    @property
    def ok(self) -> bool:
        return self.whole_fraction >= MIN_WHOLE_FRACTION


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, words: list[tuple[str, int]]) -> TokenizerCheck:
    """Encode each (text, id) and count those that come out as exactly that id."""
    whole = 0
    broken: list[tuple[str, tuple[str, ...]]] = []
    for text, token_id in words:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids == [token_id]:
            whole += 1
        elif len(broken) < 5:
            broken.append((text, tuple(tokenizer.convert_ids_to_tokens(ids))))
    return TokenizerCheck(len(words), whole, tuple(broken))


def require_tokenizer_matches(tokenizer: PreTrainedTokenizerBase, vocab: GGUFVocab, origin: str) -> None:
    """ModelSourceError unless `tokenizer` keeps the vocabulary's whole words whole."""
    result = check_tokenizer(tokenizer, vocab.whole_words())
    if not result.ok:
        examples = ", ".join(f"{word!r} -> {list(pieces)}" for word, pieces in result.broken)
        raise ModelSourceError(
            f"{origin}: the tokenizer splits words that the model's vocabulary holds as one "
            f"token ({result.checked - result.whole} of {result.checked} sampled, e.g. "
            f"{examples}): the model would be trained on text it never saw split this way. "
            f"{TOKENIZER_HINT}"
        )
