"""The two kinds of example a client trains on, independent of any tokenizer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassificationExample:
    """A text and the index of its label in the task's label list."""

    text: str
    label: int


@dataclass(frozen=True)
class GenerationExample:
    """A prompt and the completion the model should learn to produce after it."""

    prompt: str
    completion: str


Example = ClassificationExample | GenerationExample
"""Either kind; a task holds examples of one kind only (LocalTask checks)."""
