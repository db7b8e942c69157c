"""Streamed, block-by-block loading: assigned blocks trainable, the rest frozen (compressed).

`load_model` builds the model's skeleton on the meta device and then, for the non-block
weights and for each block in turn, reads only that part from the source, builds it in its
target precision, installs it and drops the fp32 copy. The device therefore never holds the
whole model in full precision: the peak while loading is the steady footprint plus one
block (or the embedding) in fp32.

Precisions (names from quantize.py): an assigned block holds fp32 (or bf16/fp16) parameters,
`requires_grad=False` since ZO needs no autograd; a frozen block holds its Linear layers in
`frozen_dtype` (nf4, int8 or a plain dtype) and its other parameters (norms, biases of
non-Linear modules) in the training dtype. Embeddings, final norm and head are held in the
training dtype too, so the activations, and the compute dtype of every layer, are the
training dtype.

The engine re-materialises blocks through `install_block` / `reassign` with fp32 state dicts
it builds from `source.block_state_dict(b)` plus its coefficient table.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from zorba_edge.common.memory_model import ModelFootprint
from zorba_edge.errors import AssignmentError, ModelSourceError
from zorba_edge.model.families import find_blocks
from zorba_edge.model.quantize import (
    PLAIN_DTYPES,
    PRECISIONS,
    check_precision,
    frozen_layer,
    held_bytes,
    plain_layer,
    require_bitsandbytes,
)
from zorba_edge.model.skeleton import (
    build_skeleton,
    linear_layers,
    model_footprint,
    non_block_parameter_names,
    normalize_assignment,
    registration_lock,
)
from zorba_edge.model.sources import ModelSource, StateDict, check_state_dict

Materialize = Callable[[int], StateDict]


@dataclass(frozen=True)
class LoadConfig:
    """How a client holds the model."""

    train_dtype: str = "fp32"
    """Assigned blocks, embeddings/head and norms; also the activations' dtype."""
    frozen_dtype: str = "nf4"
    """Linear layers of frozen blocks: nf4, int8 (bitsandbytes), bf16, fp16 or fp32."""
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_precision(self.train_dtype, "train_dtype", tuple(PLAIN_DTYPES))
        check_precision(self.frozen_dtype, "frozen_dtype", PRECISIONS)

    @property
    def compute_dtype(self) -> torch.dtype:
        return PLAIN_DTYPES[self.train_dtype]


@dataclass(frozen=True)
class BlockInfo:
    """One block as currently held."""

    index: int
    trainable: bool
    params: int
    """Logical parameter count (as in full precision)."""
    bytes: int
    """Bytes of weights as held: parameters plus quantisation statistics."""
    precision: str
    """Precision of its Linear layers (`fp32`, `nf4`, ...)."""


def _set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


class LoadedModel:
    """A causal LM held for ZO training: which blocks are trainable, and how the rest is held."""

    def __init__(self, skeleton: PreTrainedModel, source: ModelSource, config: LoadConfig) -> None:
        self.model = skeleton
        self.blocks: nn.ModuleList = find_blocks(skeleton)
        self.source = source
        self.config = config
        self.assignment: tuple[int, ...] = ()
        self._device = torch.device(config.device)
        self._footprint = model_footprint(skeleton)
        # Meta-device copies of each block's Linear layers: the shape of a trainable layer
        # to rebuild after the block was held quantised.
        self._templates = [
            {path: _meta_copy(layer) for path, layer in linear_layers(block).items()}
            for block in self.blocks
        ]
        self._shapes = [
            {name: tuple(p.shape) for name, p in block.named_parameters()} for block in self.blocks
        ]
        params = dict(skeleton.named_parameters())
        self._non_block_shapes = {
            name: tuple(params[name].shape) for name in non_block_parameter_names(skeleton)
        }
        for module in skeleton.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module.register_buffer(
                    name,
                    buffer.to(self._device),
                    persistent=name not in module._non_persistent_buffers_set,
                )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _check_block(self, block: int) -> None:
        normalize_assignment([block], self.num_blocks)

    def trainable_parameters(self, block: int) -> list[tuple[str, nn.Parameter]]:
        """The block's parameters sorted by name relative to it: the order the noise uses."""
        self._check_block(block)
        if block not in self.assignment:
            raise AssignmentError(
                f"block {block} is frozen (assigned blocks: {list(self.assignment)}): only "
                "assigned blocks have trainable parameters"
            )
        return sorted(self.blocks[block].named_parameters(), key=lambda item: item[0])

    @torch.no_grad()
    def install_block(self, block: int, state_dict: StateDict, trainable: bool) -> None:
        """Hold `block` with these fp32 weights, trainable (full precision) or frozen.

        Takes ownership of the tensors: where no conversion is needed (fp32 into an fp32
        trainable block) the parameters *are* those tensors, so callers must not reuse them.
        """
        self._check_block(block)
        check_state_dict(
            state_dict, self._shapes[block], f"block {block} state dict", "install_block"
        )
        with registration_lock():
            self._install_block(block, state_dict, trainable)

    def _install_block(self, block: int, state_dict: StateDict, trainable: bool) -> None:
        target = self.blocks[block]
        dtype = self.config.compute_dtype
        inside_layers: set[str] = set()
        for path, template in self._templates[block].items():
            weights = {k: state_dict[f"{path}.{k}"] for k, _ in template.named_parameters()}
            inside_layers.update(f"{path}.{k}" for k in weights)
            if trainable:
                layer = plain_layer(template, weights, dtype, self._device)
            else:
                layer = frozen_layer(
                    template, weights, self.config.frozen_dtype, dtype, self._device
                )
            target.set_submodule(path, layer.train(target.training))
        for name, tensor in state_dict.items():
            if name not in inside_layers:
                _set_parameter(target, name, tensor.to(device=self._device, dtype=dtype))
        assigned = set(self.assignment)
        if trainable:
            assigned.add(block)
        else:
            assigned.discard(block)
        self.assignment = tuple(sorted(assigned))

    @torch.no_grad()
    def install_non_block(self, state_dict: StateDict) -> None:
        """Hold embeddings, final norm and head (re-tying a tied head to the embedding)."""
        check_state_dict(state_dict, self._non_block_shapes, "non-block weights", "install")
        dtype = self.config.compute_dtype
        with registration_lock():
            for name, tensor in state_dict.items():
                _set_parameter(self.model, name, tensor.to(device=self._device, dtype=dtype))
            self.model.tie_weights()

    def reassign(self, assignment: Iterable[int], materialize: Materialize) -> None:
        """Make `assignment` the trainable blocks, re-installing only blocks whose role changed."""
        new = normalize_assignment(assignment, self.num_blocks)
        for block in sorted(set(new) ^ set(self.assignment)):
            self.install_block(block, materialize(block), trainable=block in new)
            release_freed_memory()

    def footprint(self) -> ModelFootprint:
        return self._footprint

    def block_report(self) -> list[BlockInfo]:
        report = []
        for index, block in enumerate(self.blocks):
            trainable = index in self.assignment
            report.append(
                BlockInfo(
                    index=index,
                    trainable=trainable,
                    params=self._footprint.block_params[index],
                    bytes=held_bytes(block),
                    precision=self.config.train_dtype if trainable else self.config.frozen_dtype,
                )
            )
        return report

    def check_complete(self) -> None:
        """ModelSourceError if any parameter was never installed (still on the meta device)."""
        missing = [name for name, p in self.model.named_parameters() if p.is_meta]
        if missing:
            raise ModelSourceError(
                f"{len(missing)} parameters were never loaded, e.g. {missing[:4]}: "
                "the source does not cover the whole model"
            )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed while loading back to the OS (glibc; elsewhere a no-op).

    Loading frees one fp32 block after another; glibc keeps such chunks in its heap, so the
    process would stay at its loading peak and the client's measured footprint, which the
    scheduler calibrates against, would be the peak rather than what it holds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _meta_copy(layer: nn.Module) -> nn.Module:
    return copy.deepcopy(layer).to("meta")


def load_model(
    source: ModelSource,
    assignment: Iterable[int],
    config: LoadConfig | None = None,
    materialize: Materialize | None = None,
) -> LoadedModel:
    """Stream `source` into a model whose `assignment` blocks are trainable.

    `materialize(b)` gives block b's fp32 weights (default: the source's base weights; the
    engine passes base + coefficient table when resuming a run).
    """
    config = config or LoadConfig()
    require_bitsandbytes(config.frozen_dtype)
    loaded = LoadedModel(build_skeleton(source.config), source, config)
    blocks = normalize_assignment(assignment, loaded.num_blocks)
    materialize = materialize or source.block_state_dict
    loaded.install_non_block(source.non_block_state_dict())
    release_freed_memory()
    for block in range(loaded.num_blocks):
        loaded.install_block(block, materialize(block), trainable=block in blocks)
        # Without this, glibc keeps each block's freed fp32 copy and quantisation
        # temporaries in its heap and the resident size creeps up block by block.
        release_freed_memory()
    loaded.check_complete()
    return loaded
