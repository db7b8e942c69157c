"""Errors a user can act on. Each message says what was wrong and what to do."""

from __future__ import annotations


class ZorbaError(Exception):
    """Base of every error zorba-edge raises on purpose."""


class UnsupportedArchitectureError(ZorbaError):
    """The model's class has no known list of transformer blocks."""


class AssignmentError(ZorbaError, ValueError):
    """An assignment names blocks that do not exist, or is otherwise malformed."""


class DTypeError(ZorbaError, ValueError):
    """A precision name or tensor dtype that this path cannot use."""


class InvalidScalarError(ZorbaError, ValueError):
    """A projected gradient or coefficient that is NaN, infinite or out of range."""


class ModelSourceError(ZorbaError):
    """A model file or directory that is missing, unreadable or inconsistent."""


class DataError(ZorbaError, ValueError):
    """A data file that is missing, empty or malformed (the message names the line)."""
