"""Prompt templates for classification by label-word scoring (MeZO / LM-BFF style).

An example is rendered as `prefix + text + suffix`; the model's next-token logits after the
suffix are compared over one label word per class. For the sentiment tasks (SST-2, MR) that
is `"<review> It was"` followed by `" terrible"` or `" great"`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from zorba_edge.errors import DataError


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


def label_word_ids(tokenizer: PreTrainedTokenizerBase, template: PromptTemplate) -> list[int]:
    """The single token id of each label word; DataError when a word is not exactly one token.

    Scoring by one next-token logit per class is only exact when every label word is a single
    token and no two share it (MeZO scores multi-token candidates by their whole likelihood,
    which this loss does not do).
    """
    ids: list[int] = []
    for name, word in zip(template.label_names, template.label_words, strict=True):
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise DataError(
                f"label word {word!r} (label {name!r}) is {len(tokens)} tokens {pieces} for this "
                "tokenizer; choose label words that are one token each (often with a leading "
                "space, e.g. ' great')"
            )
        if tokens[0] == tokenizer.unk_token_id:
            raise DataError(
                f"label word {word!r} (label {name!r}) is the unknown token for this tokenizer; "
                "choose a label word in its vocabulary"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise DataError(
            f"label words {template.label_words!r} map to token ids {ids} with repeats; "
            "choose label words that the tokenizer tells apart"
        )
    return ids
