"""Export base + alpha as a standard transformers checkpoint (sharded safetensors).

The fine-tuned model is never held whole: each block is rebuilt from its base weights
plus the coefficient table's column and written to its own shard, and an index file ties
the shards together, so `AutoModelForCausalLM.from_pretrained(out_dir)` loads it and
exporting needs about one block of extra memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from zorba_common.errors import ModelSourceError
from zorba_edge.engine.coefficients import CoefficientTable, block_materializer
from zorba_edge.model.families import family_of
from zorba_edge.model.progress import Progress
from zorba_edge.model.readout_export import body_blocks, readout_head
from zorba_edge.model.skeleton import build_skeleton
from zorba_edge.model.sources import SAFETENSORS_INDEX, ModelSource


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_checkpoint(
    source: ModelSource,
    table: CoefficientTable,
    run_seed: int,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    save_tokenizer: bool = True,
    progress: Progress | None = None,
    readout_tokens: Sequence[int] | None = None,
) -> Path:
    """Write theta0 + alpha to `out_dir`; returns the directory. `progress` counts blocks.

    A table with the label readout's column writes an untied head with its rows
    (zorba_edge/model/readout_export.py; `readout_tokens`: the task's label tokens)."""
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ModelSourceError(f"{out} exists and is not empty: choose a new directory for the export")
    family = family_of(build_skeleton(source.config))
    num_blocks = body_blocks(table, getattr(source.config, "num_hidden_layers", None))
    head = readout_head(source, table, run_seed, num_blocks, readout_tokens)
    out.mkdir(parents=True, exist_ok=True)
    materialize = block_materializer(source.block_state_dict, table, run_seed)
    weight_map: dict[str, str] = {}
    total_bytes = 0

    def write_shard(filename: str, state: dict[str, torch.Tensor]) -> None:
        nonlocal total_bytes
        tensors = {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        # safetensors creates its files 0600; give the shards the mode every other file of
        # the checkpoint gets (0666 less the umask), so whoever can read the config can load it.
        os.chmod(out / filename, 0o666 & ~_umask())
        for name, tensor in tensors.items():
            weight_map[name] = filename
            total_bytes += tensor.numel() * tensor.element_size()

    shards = num_blocks + 1
    non_block = source.non_block_state_dict()
    if head is not None:
        non_block[head.name] = head.weight
    write_shard(f"model-{0:05d}-of-{shards:05d}.safetensors", non_block)
    for block in range(num_blocks):
        prefix = family.block_prefix(block)
        state = {prefix + name: tensor for name, tensor in materialize(block).items()}
        write_shard(f"model-{block + 1:05d}-of-{shards:05d}.safetensors", state)
        if progress is not None:
            progress(block + 1, num_blocks)

    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = source.config.__class__.from_dict(source.config.to_dict())
    config.dtype = dtype  # torch_dtype's name since transformers 4.56 (the old one warns)
    if head is not None and head.was_tied:
        config.tie_word_embeddings = False  # the head now has rows of its own
    config.save_pretrained(out)
    if save_tokenizer:
        try:
            source.tokenizer().save_pretrained(out)
        except ModelSourceError:
            pass  # a config-only source (tests) has no tokenizer to ship
    return out
