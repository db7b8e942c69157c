"""Prompt templates for classification by label-word scoring (MeZO / LM-BFF style).

An example is rendered as `prefix + text + suffix`; each class is scored by the likelihood
of its label word (any number of tokens) following the suffix. For the sentiment tasks
(SST-2, MR) that is `"<review> It was"` followed by `" terrible"` or `" great"`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from zorba_common.errors import DataError


@dataclass(frozen=True)
class PromptTemplate:
    """How a text is turned into a prompt, and which word stands for each label."""

    label_names: tuple[str, ...]
    """Names of the labels in index order, as a JSONL file may spell them."""
    label_words: tuple[str, ...]
    """The word that follows the prompt for each label, leading space included."""
    suffix: str = ""
    """Text after the example; the label word is predicted right after it."""
    prefix: str = ""
    """Text before the example (an instruction, say)."""

    def __post_init__(self) -> None:
        if len(self.label_names) < 2:
            raise ValueError(f"a template needs at least two labels, got {self.label_names!r}")
        if len(self.label_names) != len(self.label_words):
            raise ValueError(
                f"{len(self.label_names)} label names but {len(self.label_words)} label words: "
                "give exactly one label word per label"
            )
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label names must be distinct, got {self.label_names!r}")
        if len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"label words must be distinct, got {self.label_words!r}")

    def render(self, text: str) -> str:
        return f"{self.prefix}{text.strip()}{self.suffix}"


# The MeZO/LM-BFF template for SST-2 and MR: the review, then "It was", then the label word.
SENTIMENT_TEMPLATE = PromptTemplate(
    label_names=("negative", "positive"),
    label_words=(" terrible", " great"),
    suffix=" It was",
)


def label_token_ids(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate) -> list[list[int]]:
    """The token ids of each label word, as it follows the prompt; DataError naming the word
    when one is empty, holds the unknown token, or tokenises like another label's word.

    A label word may be any number of tokens: the losses score a label by the summed
    log-likelihood of all its tokens after the prompt (losses.label_scores).
    """
    sequences: list[list[int]] = []
    for name, word in zip(template.label_names, template.label_words, strict=True):
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if not tokens:
            raise DataError(
                f"label word {word!r} (label {name!r}) has no tokens for this tokenizer; give "
                "a non-empty label word (--label-words)")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in tokens:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise DataError(
                f"label word {word!r} (label {name!r}) contains the unknown token ({pieces}) for "
                "this tokenizer; choose a label word made of characters it knows")
        sequences.append(tokens)
    seen: dict[tuple[int, ...], str] = {}
    for word, tokens in zip(template.label_words, sequences, strict=True):
        if tuple(tokens) in seen:
            raise DataError(
                f"label words {seen[tuple(tokens)]!r} and {word!r} tokenise the same ({tokens}) "
                "with repeats; choose label words that the tokenizer tells apart")
        seen[tuple(tokens)] = word
    return sequences
