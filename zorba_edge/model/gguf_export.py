"""Export base + alpha as a GGUF file, where llama.cpp, Ollama and LM Studio serve models.

Tensors are named and laid out as llama.cpp's `convert_hf_to_gguf.py` writes them: names
from gguf-py's own tensor map (`gguf.get_tensor_name_map`), Llama's q/k projections permuted
into llama.cpp's rotary layout (the inverse of what transformers' GGUF loader undoes), norms
kept F32, matrices F16 or Q8_0. Like the checkpoint export, the file is written one block at
a time (tensor table first, then each block's data as it is rebuilt), so it needs about one
block of extra memory.

Metadata: a GGUF base model's own keys are copied (its tokenizer, chat template, rope and
norm settings, so the file serves exactly as the base did) with the file type replaced; a
transformers-directory base gets the architecture keys from its config and no tokenizer
(llama.cpp's `convert_hf_to_gguf.py` on a checkpoint export is the route there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig

from zorba_common.errors import ModelSourceError, UnsupportedArchitectureError
from zorba_edge.engine.coefficients import CoefficientTable, block_materializer
from zorba_edge.model.families import family_of
from zorba_edge.model.progress import Progress
from zorba_edge.model.readout_export import body_blocks, readout_head
from zorba_edge.model.skeleton import build_skeleton
from zorba_edge.model.sources import ModelSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFType:
    """An output type: how matrices are stored, and the file type llama.cpp reports."""

    name: str
    matrix: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


GGUF_TYPES = {t.name: t for t in (
    GGUFType("f16", gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    GGUFType("q8_0", gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
)}

# transformers model_type -> llama.cpp architecture. Mistral is llama.cpp's llama (as its
# converter writes it); other families have tensors (biases, extra norms) or weight offsets
# this writer does not reproduce, and are refused rather than written subtly wrong.
_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
_COPIED_KEY_SKIPS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def _architecture(config: PretrainedConfig) -> gguf.MODEL_ARCH:
    arch = _ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UnsupportedArchitectureError(
            f"GGUF export supports {', '.join(sorted(_ARCHITECTURES))} models; this one is "
            f"{config.model_type!r}: export a checkpoint (--format checkpoint) and convert it with "
            "llama.cpp's convert_hf_to_gguf.py")
    return arch


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k permutation: transformers' rotary halves -> llama.cpp's pairs."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_theta(config: PretrainedConfig) -> float:
    parameters = getattr(config, "rope_parameters", None)  # transformers 5
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


class _Layout:
    """HF parameter name -> (GGUF name, storage type), and the array as llama.cpp stores it."""

    def __init__(self, config: PretrainedConfig, kind: GGUFType) -> None:
        self.config = config
        self.kind = kind
        self.arch = _architecture(config)
        self.names = gguf.get_tensor_name_map(self.arch, config.num_hidden_layers)

    def gguf_name(self, hf_name: str) -> str:
        found = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UnsupportedArchitectureError(f"no GGUF name for tensor {hf_name!r}")
        return found

    def storage(self, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
        # llama.cpp keeps vectors (norms) F32; Q8_0 needs rows in whole 32-value blocks.
        if len(shape) < 2:
            return gguf.GGMLQuantizationType.F32
        block, _ = gguf.GGML_QUANT_SIZES[self.kind.matrix]
        return self.kind.matrix if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, self.storage(shape))))

    def array(self, hf_name: str, tensor: torch.Tensor) -> np.ndarray:
        data = tensor.detach().to(torch.float32).cpu().numpy()
        heads = self.config.num_attention_heads
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = llama_cpp_permute(data, heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = llama_cpp_permute(data, getattr(self.config, "num_key_value_heads", None) or heads)
        qtype = self.storage(tuple(data.shape))
        if qtype == gguf.GGMLQuantizationType.F32:
            return np.ascontiguousarray(data)
        if qtype == gguf.GGMLQuantizationType.F16:
            return np.ascontiguousarray(data.astype(np.float16))
        return gguf.quants.quantize(data, qtype)


def _copy_metadata(writer: gguf.GGUFWriter, base: Path) -> None:
    reader = gguf.GGUFReader(base)
    for field in reader.fields.values():
        if field.name.startswith(_COPIED_KEY_SKIPS) or not field.types:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def _config_metadata(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    heads = config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _parameter_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every stored parameter's full name and shape, from a meta skeleton (nothing loaded);
    a tied head appears once, as the embedding."""
    return {name: tuple(p.shape) for name, p in build_skeleton(config).named_parameters()}


def export_gguf(
    source: ModelSource,
    table: CoefficientTable,
    run_seed: int,
    out_path: str | Path,
    *,
    gguf_type: str = "f16",
    name: str | None = None,
    progress: Progress | None = None,
    readout_tokens: Sequence[int] | None = None,
) -> Path:
    """Write theta0 + alpha to the GGUF file `out_path`; returns its path. A table with the
    label readout's column writes an untied `output` tensor with its rows
    (zorba_edge/model/readout_export.py; `readout_tokens`: the task's label tokens)."""
    kind = GGUF_TYPES.get(gguf_type)
    if kind is None:
        raise ModelSourceError(f"GGUF type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out_path).expanduser()
    if out.exists():
        raise ModelSourceError(f"{out} exists: choose a new file name for the export")
    config = source.config
    layout = _Layout(config, kind)
    family = family_of(build_skeleton(config))
    num_blocks = body_blocks(table, config.num_hidden_layers)
    head = readout_head(source, table, run_seed, num_blocks, readout_tokens)
    shapes = _parameter_shapes(config)
    if head is not None:  # untied: llama.cpp uses an `output` tensor where the file has one
        shapes[head.name] = tuple(head.weight.shape)
    materialize = block_materializer(source.block_state_dict, table, run_seed)

    def parts() -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
        non_block = source.non_block_state_dict()
        if head is not None:
            non_block[head.name] = head.weight
        yield None, non_block
        for block in range(num_blocks):
            prefix = family.block_prefix(block)
            yield block, {prefix + n: t for n, t in materialize(block).items()}

    # The data must follow the tensor table's order: what is not in a block, then block by block.
    in_block = [n for n in shapes if n.startswith(family.blocks_path + ".")]
    order = [n for n in shapes if n not in in_block] + in_block
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[layout.arch])
    base_path = getattr(source, "path", None)
    if isinstance(base_path, Path) and base_path.suffix.lower() == ".gguf":
        _copy_metadata(writer, base_path)
    else:
        _config_metadata(writer, config)
        log.warning("the base model is not a GGUF: the export has no tokenizer, which llama.cpp "
                    "needs to serve it; see the user's guide, export.md")
    if name:
        writer.add_name(name)
    writer.add_file_type(int(kind.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hf_name in order:
        shape = shapes[hf_name]
        writer.add_tensor_info(layout.gguf_name(hf_name), shape, np.dtype(np.float32),
                               layout.nbytes(shape), raw_dtype=layout.storage(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    written = 0
    for block, state in parts():
        for hf_name in order:
            if hf_name in state:
                writer.write_tensor_data(layout.array(hf_name, state[hf_name]))
                written += 1
        if block is not None and progress is not None:
            progress(block + 1, num_blocks)
    writer.close()
    if written != len(order):
        out.unlink(missing_ok=True)
        raise ModelSourceError(f"the model gave {written} of the {len(order)} tensors its config names")
    return out


def metadata_of(path: Path) -> dict[str, Any]:
    """A GGUF's scalar and string keys (arrays left out), for checks and messages."""
    reader = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in reader.fields.values()
            if f.types and f.types[0] != gguf.GGUFValueType.ARRAY}
