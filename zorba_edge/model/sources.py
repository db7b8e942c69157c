"""Where a model's base weights come from, read lazily one block at a time.

A source never holds the model: each call reads only the tensors it returns, converts them
to fp32 and lets go of the file, so a device can re-materialise a block from the local
base weights at any time (a new assignment, a periodic refresh) without the network and
without the whole model in memory. Three sources:

- `SafetensorsDirSource`: a transformers directory (config.json + *.safetensors).
- `GGUFSource`: a llama.cpp GGUF file, read with plain file reads (not a memory map, whose
  touched pages would count in the process's resident memory) and dequantised per tensor
  with `gguf`, named and post-processed (Llama q/k un-permutation, Gemma norm offset...)
  by transformers' own GGUF tables.
- `RandomInitSource`: a deterministic random model built from a config in code (tests).

Every source also exposes a `fingerprint`, a stable id of its base weights, so that devices
that must agree on theta0 can check that they do.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from zorba_common.errors import ModelSourceError, UnsupportedArchitectureError
from zorba_edge.model.families import family_of, find_blocks
from zorba_edge.model.gguf_reading import parse_metadata, reader_reused, transformers_config
from zorba_edge.model.gguf_tokenizer import read_gguf_vocab, vocab_from_reader
from zorba_edge.model.hub_cache import cached_model_path, looks_like_model_id
from zorba_edge.model.skeleton import (
    build_skeleton,
    non_block_parameter_names,
    normalize_assignment,
    registration_lock,
)
from zorba_edge.model.tokenizer_loading import (
    cached_gguf_tokenizer,
    gguf_tokenizer,
    is_gguf_tokenizer_cached,
    load_tokenizer_dir,
)

StateDict = dict[str, torch.Tensor]

SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAMPLES = 64
_SAMPLE_BYTES = 64 * 1024
_HEAD_BYTES = 1 << 20
_CHUNK_BYTES = 4 << 20


@runtime_checkable
class ModelSource(Protocol):
    """Base weights of one causal LM, read lazily per block."""

    config: PretrainedConfig
    fingerprint: str

    def block_state_dict(self, block: int) -> StateDict:
        """fp32 weights of one block, keyed relative to it (`self_attn.q_proj.weight`)."""
        ...

    def non_block_state_dict(self) -> StateDict:
        """fp32 embeddings, final norm and untied head, keyed by full model names."""
        ...

    def tokenizer(self) -> PreTrainedTokenizerBase: ...


def open_source(spec: str | Path, tokenizer_dir: str | Path | None = None) -> FileSource:
    """The source for a path: a directory is a transformers checkpoint, `*.gguf` a GGUF file.

    `tokenizer_dir` (`--tokenizer DIR`) replaces the model's own tokenizer. A Hugging Face
    model id (`ORG/NAME`) that is not a local path is looked up in the local HF cache."""
    path = Path(spec).expanduser()
    if not path.exists() and looks_like_model_id(str(spec)):
        path = cached_model_path(str(spec))
    if not path.exists():
        raise ModelSourceError(
            f"{path}: no such file or directory. Give a transformers model directory "
            "(config.json + *.safetensors), a .gguf file, or the id (ORG/NAME) of a model in the "
            "local Hugging Face cache."
        )
    if path.is_dir():
        return SafetensorsDirSource(path, tokenizer_dir)
    if path.suffix.lower() == ".gguf":
        return GGUFSource(path, tokenizer_dir)
    raise ModelSourceError(
        f"{path}: not a model this loader reads. Give a transformers model directory "
        "(config.json + *.safetensors) or a .gguf file."
    )


class _SkeletonNames:
    """Expected parameter names and shapes, taken from a meta-device skeleton of the model."""

    def __init__(self, config: PretrainedConfig) -> None:
        skeleton = build_skeleton(config)
        self.family = family_of(skeleton)
        blocks = find_blocks(skeleton)
        self.num_blocks = len(blocks)
        self.block_shapes = [
            {name: tuple(p.shape) for name, p in block.named_parameters()} for block in blocks
        ]
        params = dict(skeleton.named_parameters())
        self.non_block_shapes = {
            name: tuple(params[name].shape) for name in non_block_parameter_names(skeleton)
        }
        self.skeleton = skeleton

    def check_block(self, block: int) -> None:
        normalize_assignment([block], self.num_blocks)

    def block_keys(self, block: int) -> dict[str, str]:
        """Relative name -> full model name of each parameter of `block`."""
        prefix = self.family.block_prefix(block)
        return {name: prefix + name for name in self.block_shapes[block]}


def check_state_dict(
    state: StateDict, shapes: dict[str, tuple[int, ...]], what: str, origin: str
) -> None:
    """ModelSourceError unless `state` has exactly the expected names and shapes."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ModelSourceError(
            f"{origin}: {what} does not match the model: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Is the file for this config?"
        )
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ModelSourceError(
                f"{origin}: {what} {name} has shape {tuple(state[name].shape)}, the model "
                f"expects {shape}. Is the file for this config?"
            )


def _sampled_digest(paths: Iterable[Path]) -> str:
    """sha256 over each file's size, first MiB and 64 evenly spaced 64 KiB samples.

    Hashing whole multi-GB files at every start would cost seconds; headers alone would not
    tell two fine-tunes with the same shapes apart. Samples spread over the tensor data
    differ between any two different sets of weights, and reading them is cheap.
    """
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with path.open("rb") as file:
            digest.update(file.read(_HEAD_BYTES))
            if size > _HEAD_BYTES:
                step = (size - _HEAD_BYTES) // _SAMPLES
                for i in range(_SAMPLES):
                    file.seek(_HEAD_BYTES + i * step)
                    digest.update(file.read(_SAMPLE_BYTES))
    return digest.hexdigest()


class SafetensorsDirSource:
    """A transformers model directory: config.json plus one or more *.safetensors files."""

    def __init__(self, path: str | Path, tokenizer_dir: str | Path | None = None) -> None:
        self.path = Path(path).expanduser()
        self._tokenizer_dir = Path(tokenizer_dir).expanduser() if tokenizer_dir else self.path
        if not self.path.is_dir():
            raise ModelSourceError(f"{self.path}: no such directory")
        if not (self.path / "config.json").is_file():
            raise ModelSourceError(
                f"{self.path}: no config.json. A transformers model directory holds "
                "config.json and *.safetensors (model.save_pretrained(dir) writes both)."
            )
        self.config = AutoConfig.from_pretrained(self.path)
        self._names = _SkeletonNames(self.config)
        self._files = self._weight_map()
        self.fingerprint = _sampled_digest(
            [self.path / "config.json", *sorted({self.path / f for f in self._files.values()})]
        )

    def _weight_map(self) -> dict[str, str]:
        """Tensor name in the files -> file name."""
        from safetensors import safe_open

        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            hint = (
                " (found PyTorch .bin files: re-save with safe_serialization=True)"
                if any(self.path.glob("*.bin"))
                else ""
            )
            raise ModelSourceError(f"{self.path}: no *.safetensors weights{hint}")
        weight_map = {}
        for name in files:
            with safe_open(self.path / name, framework="pt") as file:
                weight_map.update(dict.fromkeys(file.keys(), name))
        return weight_map

    def _file_key(self, model_key: str) -> str:
        """The checkpoint's name for a model parameter (base-model-only files lack the prefix)."""
        if model_key in self._files:
            return model_key
        base = self._names.family.base_attribute + "."
        if model_key.startswith(base) and model_key[len(base) :] in self._files:
            return model_key[len(base) :]
        raise ModelSourceError(
            f"{self.path}: the checkpoint has no tensor for {model_key}. Is it a checkpoint "
            f"of this {type(self._names.skeleton).__name__}?"
        )

    def _read(self, keys: dict[str, str]) -> StateDict:
        """Read `{out_name: model_key}` from the files, as fp32, one file opened at a time."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for out_name, model_key in keys.items():
            file_key = self._file_key(model_key)
            by_file.setdefault(self._files[file_key], []).append((out_name, file_key))
        state: StateDict = {}
        for file_name, entries in by_file.items():
            with safe_open(self.path / file_name, framework="pt") as file:
                for out_name, file_key in entries:
                    state[out_name] = file.get_tensor(file_key).to(torch.float32)
        return state

    def block_state_dict(self, block: int) -> StateDict:
        self._names.check_block(block)
        state = self._read(self._names.block_keys(block))
        check_state_dict(state, self._names.block_shapes[block], f"block {block}", str(self.path))
        return state

    def non_block_state_dict(self) -> StateDict:
        state = self._read({name: name for name in self._names.non_block_shapes})
        check_state_dict(state, self._names.non_block_shapes, "non-block weights", str(self.path))
        return state

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer_dir(self._tokenizer_dir)


@dataclass(frozen=True)
class _GGUFTensor:
    """Where one tensor's bytes are in the file and how to view them."""

    name: str
    qtype: int
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


class GGUFSource:
    """A GGUF file, dequantised to fp32 tensor by tensor."""

    def __init__(self, path: str | Path, tokenizer_dir: str | Path | None = None) -> None:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelSourceError(f"{self.path}: no such GGUF file")
        with self.path.open("rb") as file:
            if file.read(4) != b"GGUF":
                raise ModelSourceError(f"{self.path}: not a GGUF file (no GGUF magic number)")
        self.fingerprint = _sampled_digest([self.path])
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer: PreTrainedTokenizerBase | None = None
        # The one parse of the metadata: config, tensor table and (when it must be built)
        # the tokenizer are all read from it (gguf_reading.py says why that matters).
        reader = parse_metadata(self.path)
        try:
            parsed = transformers_config(reader, self.path)
        except ValueError as error:
            raise UnsupportedArchitectureError(f"{self.path}: {error}") from error
        self.config = AutoConfig.for_model(**parsed)
        self._names = _SkeletonNames(self.config)
        architecture = read_field(reader, "general.architecture")[0]
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
        weights_map = get_gguf_hf_weights_map
        if "processor" in inspect.signature(weights_map).parameters:
            # transformers 5 lets the processor rename tensors while mapping; 4.57 does not.
            weights_map = functools.partial(weights_map, processor=self._processor)
        self._hf_names = _gguf_name_map(self._names.skeleton, weights_map)
        self._tensors = {
            t.name: _GGUFTensor(
                t.name,
                int(t.tensor_type),
                t.data.dtype,
                tuple(t.data.shape),
                int(t.data_offset),
                int(t.n_bytes),
            )
            for t in reader.tensors
        }
        self._tokenizer_error: ModelSourceError | None = None
        if tokenizer_dir is not None or not is_gguf_tokenizer_cached(self.fingerprint):
            # Built (and checked) now, while the vocabulary is parsed; a cached one loads
            # when first asked for. A file without a usable tokenizer still opens (its
            # weights load); the error comes when the tokenizer is asked for.
            try:
                with reader_reused(reader, self.path):
                    self._tokenizer = gguf_tokenizer(self.path, self.fingerprint,
                                                     vocab_from_reader(reader, self.path),
                                                     tokenizer_dir)
            except ModelSourceError as error:
                self._tokenizer_error = error
        # Drop the reader: its memory map would keep every page we touch resident, and its
        # per-element numpy views number about a million for Gemma 3's vocabulary.
        del reader

    def _read_tensors(self, wanted: set[str]) -> StateDict:
        """Dequantise and post-process the GGUF tensors that map to the model names `wanted`."""
        state: StateDict = {}
        # Some processors return a renamed tensor through this side channel (GPT-2's head).
        side: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
        names = [g for g, hf in self._hf_names.items() if hf in wanted and g in self._tensors]
        with self.path.open("rb") as file:
            for gguf_name in names:
                result = self._processor.process(
                    weights=self._dequantize(file, self._tensors[gguf_name]),
                    name=gguf_name,
                    tensor_key_mapping=self._hf_names,
                    parsed_parameters=side,
                )
                if result.name is not None and result.name in self._hf_names:
                    array = np.ascontiguousarray(result.weights, dtype=np.float32)
                    state[self._hf_names[result.name]] = torch.from_numpy(array)
        for name, tensor in side["tensors"].items():
            if name in wanted:
                state[name] = tensor.to(torch.float32)
        return state

    def _read_bytes(self, file: io.BufferedReader, offset: int, size: int, name: str) -> bytearray:
        file.seek(offset)
        raw = bytearray(size)
        if file.readinto(raw) != size:
            raise ModelSourceError(f"{self.path}: tensor {name} is truncated; the file is damaged")
        return raw

    def _dequantize(self, file: io.BufferedReader, entry: _GGUFTensor) -> np.ndarray:
        """One tensor as fp32, dequantised in row chunks.

        Whole-tensor dequantisation makes temporaries several times the fp32 size: for an
        embedding table that alone would lift the loading peak far above the steady
        footprint. In chunks, the only full-size array is the result.
        """
        from gguf import GGMLQuantizationType, dequantize

        qtype = GGMLQuantizationType(entry.qtype)
        rows = entry.shape[0] if len(entry.shape) >= 2 else 1
        if rows == 1 or entry.n_bytes <= _CHUNK_BYTES:
            raw = self._read_bytes(file, entry.offset, entry.n_bytes, entry.name)
            return dequantize(np.frombuffer(raw, dtype=entry.dtype).reshape(entry.shape), qtype)
        row_bytes = entry.n_bytes // rows
        step = max(1, _CHUNK_BYTES // row_bytes)
        out: np.ndarray | None = None
        for start in range(0, rows, step):
            count = min(step, rows - start)
            raw = self._read_bytes(
                file, entry.offset + start * row_bytes, count * row_bytes, entry.name
            )
            chunk = np.frombuffer(raw, dtype=entry.dtype).reshape(count, *entry.shape[1:])
            part = dequantize(chunk, qtype)
            if out is None:
                out = np.empty((rows, *part.shape[1:]), dtype=np.float32)
            out[start : start + count] = part
        assert out is not None
        return out

    def block_state_dict(self, block: int) -> StateDict:
        self._names.check_block(block)
        keys = self._names.block_keys(block)
        full = self._read_tensors(set(keys.values()))
        state = {rel: full[key] for rel, key in keys.items() if key in full}
        check_state_dict(state, self._names.block_shapes[block], f"block {block}", str(self.path))
        return state

    def non_block_state_dict(self) -> StateDict:
        state = self._read_tensors(set(self._names.non_block_shapes))
        check_state_dict(state, self._names.non_block_shapes, "non-block weights", str(self.path))
        return state

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, checked against the file's own vocabulary (built at open, or
        loaded from the cache of one built and checked before)."""
        if self._tokenizer_error is not None:
            raise self._tokenizer_error
        if self._tokenizer is None:
            self._tokenizer = cached_gguf_tokenizer(self.fingerprint)
        if self._tokenizer is None:  # the cache was emptied since the open: build it again
            self._tokenizer = gguf_tokenizer(self.path, self.fingerprint,
                                             read_gguf_vocab(self.path), self._tokenizer_dir)
        return self._tokenizer


class _TopLevelView:
    """A model seen without its children, for `get_gguf_hf_weights_map`.

    That function maps the model's names and then recurses into every submodule (for
    checkpoints converted from a base model), rebuilding gguf's name table each time: about
    400 rebuilds and several seconds for a 30-layer model, to find nothing new for the
    families here. The top-level pass alone gives the same map; the caller falls back to
    the full recursion when it does not cover every parameter.
    """

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self._state = model.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def named_children(self) -> list[tuple[str, nn.Module]]:
        return []


def _gguf_name_map(
    skeleton: nn.Module, weights_map: Callable[..., dict[str, str]]
) -> dict[str, str]:
    """gguf tensor name -> model name, from the tables transformers' GGUF loader uses."""
    names = weights_map(_TopLevelView(skeleton))
    wanted = set(dict(skeleton.named_parameters()))
    if not wanted <= set(names.values()):
        names = weights_map(skeleton)
    return names


def _seed_for(seed: int, name: str) -> int:
    """A torch seed for one named part of a random model, independent of the other parts."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


FileSource = SafetensorsDirSource | GGUFSource
"""A ModelSource read from a file or directory, which it names as `path`."""


class RandomInitSource:
    """A deterministic random model for tests: the model's own init, block by block.

    Each block (and each non-block module) is initialised by the model class's
    `_init_weights` from its own seed, so a block's weights do not depend on which other
    blocks were read or in which order. Vector parameters (norm weights, biases) are then
    jittered, because an init of all ones or zeros would let a test that mixes them up pass.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        seed: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.config = config
        self.seed = seed
        self._tokenizer = tokenizer
        self._names = _SkeletonNames(config)
        text = json.dumps(config.to_dict(), sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(f"random:{seed}:{text}".encode()).hexdigest()

    def _materialise(self, module: nn.Module, name: str) -> StateDict:
        skeleton = self._names.skeleton
        with registration_lock():
            module = copy.deepcopy(module).to_empty(device="cpu")
        std = getattr(self.config, "initializer_range", 0.02)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(_seed_for(self.seed, name))
            module.apply(skeleton._init_weights)
            for param in module.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param), alpha=std)
        return {key: p.detach() for key, p in module.named_parameters()}

    def block_state_dict(self, block: int) -> StateDict:
        self._names.check_block(block)
        blocks = find_blocks(self._names.skeleton)
        return self._materialise(blocks[block], f"block{block}")

    def non_block_state_dict(self) -> StateDict:
        skeleton = self._names.skeleton
        wanted = self._names.non_block_shapes
        state: StateDict = {}
        for module_name, module in skeleton.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            prefix = f"{module_name}." if module_name else ""
            if not any(prefix + n in wanted and prefix + n not in state for n in own):
                continue
            for key, tensor in self._materialise(module, module_name).items():
                if prefix + key in wanted and prefix + key not in state:
                    state[prefix + key] = tensor
        return state

    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise ModelSourceError(
                "this random model was built without a tokenizer: pass one to RandomInitSource"
            )
        return self._tokenizer
