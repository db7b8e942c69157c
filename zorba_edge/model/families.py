"""Where each supported causal-LM family keeps its transformer blocks.

A *block* is one decoder layer (docs/design.md §1). transformers has no common accessor for the
list of layers, so each family names its path here. Families are matched by the model's
class name rather than by importing every model class, which keeps this table cheap to
read and to extend: a new family is one line plus a tiny config in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from zorba_common.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """One architecture family: the causal-LM classes it covers and where their blocks live."""

    name: str
    model_classes: tuple[str, ...]
    blocks_path: str
    """Dotted attribute path from the causal-LM module to its `nn.ModuleList` of blocks."""

    @property
    def base_attribute(self) -> str:
        """The base-model attribute (`model`, `transformer`); base-only checkpoints omit it."""
        return self.blocks_path.split(".", 1)[0]

    def block_prefix(self, block: int) -> str:
        """Full parameter-name prefix of one block, e.g. `model.layers.3.`."""
        return f"{self.blocks_path}.{block}."


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), "model.layers"),
    Family("mistral", ("MistralForCausalLM",), "model.layers"),
    Family("qwen2", ("Qwen2ForCausalLM",), "model.layers"),
    Family("qwen3", ("Qwen3ForCausalLM",), "model.layers"),
    Family("gemma2", ("Gemma2ForCausalLM",), "model.layers"),
    Family("gemma3", ("Gemma3ForCausalLM",), "model.layers"),
    Family("gpt2", ("GPT2LMHeadModel",), "transformer.h"),
)

_BY_CLASS = {cls: family for family in FAMILIES for cls in family.model_classes}


def supported_classes() -> list[str]:
    return sorted(_BY_CLASS)


def family_of(model: nn.Module) -> Family:
    """The family of `model`, or UnsupportedArchitectureError naming its class."""
    name = type(model).__name__
    family = _BY_CLASS.get(name)
    if family is None:
        raise UnsupportedArchitectureError(
            f"{name} is not a supported architecture: zorba-edge knows where the transformer "
            f"blocks are only for {', '.join(supported_classes())}. Use one of those, or add "
            f"the class and its blocks path to zorba_edge/model/families.py."
        )
    return family


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    family = family_of(model)
    blocks = model.get_submodule(family.blocks_path)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}.{family.blocks_path} is a {type(blocks).__name__}, not an "
            "nn.ModuleList: this transformers version lays the model out differently from the "
            "one zorba-edge was written for."
        )
    return blocks
