"""Streamed, block-by-block loading: assigned blocks trainable, the rest frozen (compressed).

`load_model` builds the model's skeleton on the meta device and then, for the non-block
weights and for each block in turn, reads only that part from the source, builds it in its
target precision, installs it and drops the fp32 copy. The device therefore never holds the
whole model in full precision: the peak while loading is the steady footprint plus one
block (or the embedding) in fp32.

Precisions (names from quantize.py): an assigned block holds fp32 (or bf16/fp16) parameters,
`requires_grad=False` since ZO needs no autograd; a frozen block holds its Linear layers in
`frozen_dtype` (nf4, int8 or a plain dtype) and its other parameters (norms, biases of
non-Linear modules) in the training dtype. Embeddings and head are held in `embed_dtype`
(the training dtype unless asked otherwise) and the final norm in the training dtype. The
activations, and the compute dtype of every layer, are the training dtype: a narrower
embedding's output is widened as it leaves the lookup, and a narrower head is computed in
the training dtype a chunk of rows at a time (quantize.CastLinear), so the logits are as
precise as with a full-precision head and only the head's weights are rounded.

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

from zorba_common.errors import AssignmentError, ModelSourceError
from zorba_common.memory_model import HEAD_CAST_CHUNK_BYTES, ModelFootprint
from zorba_edge.model.assignment import check_assignment, check_block
from zorba_edge.model.families import find_blocks
from zorba_edge.model.progress import Progress
from zorba_edge.model.quantize import (
    PLAIN_DTYPES,
    PRECISIONS,
    CastLinear,
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
    embed_dtype: str | None = None
    """Embeddings and LM head (frozen in every run): fp32, bf16 or fp16; None, the
    train_dtype. Gemma 3's 262k-token embedding is its largest single weight."""

    def __post_init__(self) -> None:
        check_precision(self.train_dtype, "train_dtype", tuple(PLAIN_DTYPES))
        check_precision(self.frozen_dtype, "frozen_dtype", PRECISIONS)
        if self.embed_dtype is not None:
            check_precision(self.embed_dtype, "embed_dtype", tuple(PLAIN_DTYPES))

    @property
    def compute_dtype(self) -> torch.dtype:
        return PLAIN_DTYPES[self.train_dtype]

    @property
    def frozen_at_train_precision(self) -> bool:
        """Whether frozen blocks are held exactly as assigned ones (plain layers in the
        training dtype): their weights can then move in place as a trainable block's do."""
        return PLAIN_DTYPES.get(self.frozen_dtype) == self.compute_dtype

    @property
    def held_embed_dtype(self) -> str:
        """The precision the embeddings and head are held in (embed_dtype, or train_dtype)."""
        return self.embed_dtype or self.train_dtype


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
        narrow = config.held_embed_dtype != config.train_dtype
        self._narrow_names = self._adapt_embeddings() if narrow else set()
        for module in skeleton.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module.register_buffer(
                    name,
                    buffer.to(self._device),
                    persistent=name not in module._non_persistent_buffers_set,
                )

    def _adapt_embeddings(self) -> set[str]:
        """Let the embeddings and head hold a dtype other than the activations'; returns the
        names of the parameters held in embed_dtype.

        Each embedding's output is widened to the compute dtype by a forward hook (whatever
        the embedding class does inside, e.g. Gemma's scaling, runs as written); the head
        becomes a CastLinear on the same parameter, so a tied head stays tied.
        """
        dtype = self.config.compute_dtype
        in_blocks = {id(m) for m in self.blocks.modules()}
        names: set[str] = set()
        for prefix, module in self.model.named_modules():
            if isinstance(module, nn.Embedding) and id(module) not in in_blocks:
                module.register_forward_hook(lambda _m, _i, out: out.to(dtype))
                names.add(f"{prefix}.weight")
        head = self.model.get_output_embeddings()
        if head is not None and type(head) is nn.Linear:
            rows = max(1, HEAD_CAST_CHUNK_BYTES // (head.in_features * dtype.itemsize))
            path = next(p for p, m in self.model.named_modules() if m is head)
            with registration_lock():
                self.model.set_submodule(path, CastLinear(head.weight, head.bias, chunk_rows=rows))
            names.add(f"{path}.weight")
        elif head is not None:
            raise ModelSourceError(
                f"the LM head is a {type(head).__name__}, not a Linear: it cannot be held in "
                f"embed_dtype={self.config.embed_dtype}; leave --embedding-dtype unset")
        # A tied head's weight is listed once, under the embedding's name: keep the names the
        # source's non-block state dict uses.
        return names & set(self._non_block_shapes)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def trainable_parameters(self, block: int) -> list[tuple[str, nn.Parameter]]:
        """The block's parameters sorted by name relative to it: the order the noise uses."""
        if block not in self.assignment:  # the assignment holds only blocks that exist
            check_block(block, self.num_blocks)  # a block that does not exist says so
            raise AssignmentError(
                f"block {block} is frozen (assigned blocks: {list(self.assignment)}): only "
                "assigned blocks have trainable parameters"
            )
        return sorted(self.blocks[block].named_parameters(), key=lambda item: item[0])

    def exact(self, block: int) -> bool:
        """Whether `block` is held at the training precision: assigned, or frozen in it."""
        return block in self.assignment or self.config.frozen_at_train_precision

    def exact_parameters(self, block: int) -> list[tuple[str, nn.Parameter]]:
        """An `exact` block's parameters sorted by name (the noise's order), frozen or not."""
        check_block(block, self.num_blocks)
        if not self.exact(block):
            raise AssignmentError(
                f"block {block} is frozen in {self.config.frozen_dtype}, not the training "
                f"precision {self.config.train_dtype}: its weights cannot move in place")
        return sorted(self.blocks[block].named_parameters(), key=lambda item: item[0])

    @torch.no_grad()
    def install_block(self, block: int, state_dict: StateDict, trainable: bool) -> None:
        """Hold `block` with these fp32 weights, trainable (full precision) or frozen.

        Takes ownership of the tensors: where no conversion is needed (fp32 into an fp32
        trainable block) the parameters *are* those tensors, so callers must not reuse them.
        """
        check_block(block, self.num_blocks)
        self._install_block(block, state_dict, trainable)

    @torch.no_grad()
    def _install_block(self, block: int, state_dict: StateDict, trainable: bool) -> None:
        """install_block for a block known to exist (of a checked assignment, or every block)."""
        check_state_dict(
            state_dict, self._shapes[block], f"block {block} state dict", "install_block"
        )
        with registration_lock():
            self._hold_block(block, state_dict, trainable)

    def _hold_block(self, block: int, state_dict: StateDict, trainable: bool) -> None:
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
        narrow = PLAIN_DTYPES[self.config.held_embed_dtype]
        with registration_lock():
            for name, tensor in state_dict.items():
                dtype = narrow if name in self._narrow_names else self.config.compute_dtype
                _set_parameter(self.model, name, tensor.to(device=self._device, dtype=dtype))
            self.model.tie_weights()

    def non_block_bytes(self) -> int:
        """Bytes of the weights outside the blocks as held (a tied head counted once)."""
        held = dict(self.model.named_parameters())
        return sum(held[name].numel() * held[name].element_size() for name in self._non_block_shapes)

    def reassign(self, assignment: Iterable[int], materialize: Materialize) -> None:
        """Make `assignment` the trainable blocks, re-installing only blocks whose role changed.
        It is checked here unless it comes checked (`Blocks`, model/assignment.py)."""
        new = check_assignment(assignment, self.num_blocks)
        for block in sorted(set(new) ^ set(self.assignment)):
            self._install_block(block, materialize(block), trainable=block in new)
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
    progress: Progress | None = None,
) -> LoadedModel:
    """Stream `source` into a model whose `assignment` blocks are trainable.

    `materialize(b)` gives block b's fp32 weights (default: the source's base weights; the
    engine passes base + coefficient table when resuming a run). `progress` counts the
    non-block weights and then each block (num_blocks + 1 in all).
    """
    config = config or LoadConfig()
    require_bitsandbytes(config.frozen_dtype)
    loaded = LoadedModel(build_skeleton(source.config), source, config)
    blocks = check_assignment(assignment, loaded.num_blocks)
    materialize = materialize or source.block_state_dict
    total = loaded.num_blocks + 1
    loaded.install_non_block(source.non_block_state_dict())
    release_freed_memory()
    if progress is not None:
        progress(1, total)
    for block in range(loaded.num_blocks):
        loaded._install_block(block, materialize(block), trainable=block in blocks)
        # Without this, glibc keeps each block's freed fp32 copy and quantisation
        # temporaries in its heap and the resident size creeps up block by block.
        release_freed_memory()
        if progress is not None:
            progress(block + 2, total)
    loaded.check_complete()
    return loaded
