"""A model's structure without its weights, and the sizes the memory model needs.

The skeleton is built the way transformers' own `from_pretrained` builds one before
loading: every parameter on the meta device (shape and dtype, no storage) and the
non-persistent buffers (rotary frequencies, causal masks, embedding scales) real on CPU,
since no checkpoint holds them. Everything here works on a skeleton, so the server can
size a model without holding its weights.

Thread safety: `_parameters_on_meta` (what transformers 4's and accelerate's
`init_empty_weights` do; transformers 5 dropped it) gets parameters onto the meta device by
swapping `nn.Module.register_parameter` *process-wide* while the model is constructed, so
a parameter that any other thread registers meanwhile lands on the meta device too, and
two overlapping constructions can leave the swap in place for good. (A plain
`torch.device("meta")` context is thread-local but would put the buffers on the meta
device as well, and they cannot be recomputed generically.) So skeleton construction and
the loader's own parameter installation both run under `registration_lock()`: several
clients loading in one process (a simulation, the tests) then cannot catch each other's
swap. Code outside this package that registers parameters while a skeleton is built is
not covered, as with transformers' own `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager

from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from zorba_common.errors import UnsupportedArchitectureError
from zorba_common.memory_model import ModelFootprint
from zorba_edge.model.families import family_of, find_blocks

LINEAR_TYPES = (nn.Linear, Conv1D)
"""Layers a frozen block holds quantised. GPT-2's Conv1D is a Linear with its weight transposed."""


_REGISTRATION_LOCK = threading.RLock()


def registration_lock() -> AbstractContextManager[bool]:
    """Held while building a skeleton and while installing parameters (see module doc)."""
    return _REGISTRATION_LOCK


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile lands on the meta device; buffers stay real.

    transformers 5 builds its own skeletons wholly on the meta device and then recomputes
    the buffers through each model's `_init_weights`, which is internal and differs by
    version; constructing with real buffers and meta parameters works the same on 4.57 and
    5.x and keeps the rotary frequencies exactly as the model's __init__ computes them.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None:
            held = self._parameters[name]
            assert held is not None
            self._parameters[name] = nn.Parameter(held.to("meta"), requires_grad=held.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM for `config`, parameters on the meta device, in eval mode, no grads."""
    try:
        with registration_lock(), _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise UnsupportedArchitectureError(
            f"transformers has no causal LM for {type(config).__name__} "
            f"(model_type {getattr(config, 'model_type', '?')!r}): {error}"
        ) from error
    family_of(model)
    # Built empty, the head is not tied yet (from_pretrained ties after loading): tie it
    # now, or a tied head would look like a parameter of its own. Tying assigns a parameter,
    # so it too runs under the lock: while another thread builds a skeleton, the assignment
    # would otherwise be swapped for a fresh meta copy and the head left untied.
    with registration_lock():
        model.tie_weights()
    model.eval()
    model.requires_grad_(False)
    return model


def linear_layers(module: nn.Module) -> dict[str, nn.Linear | Conv1D]:
    """The Linear-like layers inside `module`, by path relative to it, in module order."""
    return {name: sub for name, sub in module.named_modules() if isinstance(sub, LINEAR_TYPES)}


def non_block_parameter_names(model: nn.Module) -> list[str]:
    """Parameters outside the blocks (embeddings, final norm, untied head), tied ones once."""
    block_params = {id(p) for p in find_blocks(model).parameters()}
    return [name for name, p in model.named_parameters() if id(p) not in block_params]


def model_footprint(model: PreTrainedModel) -> ModelFootprint:
    """Parameter counts of a skeleton (or any full-precision model) for the memory model."""
    blocks = find_blocks(model)
    block_params = tuple(sum(p.numel() for p in block.parameters()) for block in blocks)
    quantizable = tuple(
        sum(layer.weight.numel() for layer in linear_layers(block).values()) for block in blocks
    )
    # named_parameters() yields a tied parameter once, so a tied head is not counted twice.
    params = dict(model.named_parameters())
    embed_head = sum(params[name].numel() for name in non_block_parameter_names(model))
    config = model.config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return ModelFootprint(
        block_params=block_params,
        quantizable_block_params=quantizable,
        embed_head_params=embed_head,
        hidden_size=hidden,
        vocab_size=config.vocab_size,
        num_layers=len(blocks),
        intermediate_size=intermediate or 4 * hidden,
    )
