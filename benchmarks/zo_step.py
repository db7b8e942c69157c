"""Cost of one zeroth-order step against inference, on SmolLM2-135M-Instruct.

For 1, 8 and all 30 blocks assigned, with frozen blocks in nf4 and in fp32, it measures
(each configuration in fresh processes, so that peak memory is the configuration's own):
- step_over_forward: one ZO step's time divided by one forward pass's time, both measured
  in the same process on the same batch (two forward passes are the floor), for today's
  step and, as `..._before`, for the step as it was before z was hashed once per step and
  the restore fused with the update (`legacy_zo_step` below, kept only to measure against).
  Forward, old step and new step alternate within each repetition, so that a busy machine
  slows all three alike; steps_per_s and steps_per_s_before are 1 / their medians. The
  `_cpu` ratios divide the process's CPU time instead of wall time: on a shared machine they
  are the steadier figure (with --threads 1 they are exact shares of one core's work);
- peak_over_inference: the peak RSS of a training process (model, round snapshot, steps)
  divided by that of an inference-only process that holds the model in the same
  precisions and runs forward passes on the same batch. The snapshot is a client's, spilled
  to disk (zorba_edge.engine.snapshot); `peak_over_inference_host_snapshot` is the same
  with the snapshot held in host memory as before (a third process, measured in the same
  run for the comparison);
- one_sided_scalar_over_forward: one batch of the one-sided estimator (the run default, 4
  directions on one batch, 5 forwards) per reported scalar, over a forward pass; its floor
  is (n + 1) / n = 1.25 (`_cpu`: CPU time, as above);
- hash_over_forward_cpu, move_over_forward_cpu: hashing one direction over the assigned
  blocks, and one move of them along it, in forwards of CPU time: an antithetic step is
  2 forwards + 1 hash + 3 moves + the rest (Python, the loss's float); of a move,
  expand_over_forward_cpu is the expansion of the packed bits to signs (the rest is the
  update: widening the signs, the fp32 add, the parameters' memory traffic);
  difference_over_forward_cpu, local_step_over_forward_cpu: the one-sided estimator's other
  moves, theta + mu z_i -> theta + mu z_(i+1) in one pass, and its last move (restore and
  the n updates in one pass, the n - 1 earlier directions hashed again block by block): a
  one-sided batch is n + 1 forwards + n hashes + 1 move + (n - 1) differences + 1 local
  step + the rest;
- load_peak_over_steady: the peak RSS while loading divided by the RSS once loaded.
Peaks are read from VmHWM after resetting it (`/proc/self/clear_refs`), so the loading peak
does not hide the peak of the phase that follows. Linux only.

    python benchmarks/zo_step.py --json        # one JSON object on stdout, progress on stderr
    python benchmarks/zo_step.py --json --bf16 # bf16 forwards against fp32 (see `bf16_worker`)
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BATCH_SIZE = 8
SEQ_LEN = 64
ONE_SIDED_DIRECTIONS = 4
"""The run default's directions (zorba_server.config.RunConfig.directions)."""


@dataclass(frozen=True)
class Measurement:
    role: str
    assigned: int
    frozen: str
    load_s: float
    load_peak_rss: int
    steady_rss: int
    phase_peak_rss: int
    forward_s: float
    step_s: float | None
    old_step_s: float | None
    forward_cpu_s: float
    step_cpu_s: float | None
    old_step_cpu_s: float | None
    one_sided_s: float | None = None
    """One batch of the one-sided estimator over ONE_SIDED_DIRECTIONS directions."""
    one_sided_cpu_s: float | None = None
    hash_cpu_s: float | None = None
    """Hashing one direction over the assigned blocks (`Direction(...)`), CPU seconds."""
    move_cpu_s: float | None = None
    """One move of the assigned blocks along a hashed direction (`Direction.add_`)."""
    expand_cpu_s: float | None = None
    """The sign expansion of one move alone (no update)."""
    difference_cpu_s: float | None = None
    """One move from theta + mu z_1 to theta + mu z_2 (`Term(mu, z_2, z_1)`)."""
    local_step_cpu_s: float | None = None
    """The one-sided estimator's last move over ONE_SIDED_DIRECTIONS directions."""


def legacy_zo_step(model, blocks, loss_fn, batch, run_seed: int, k: int, config) -> float:
    """The step before this benchmark's change: z regenerated in full, as fp32, four times."""
    import numpy as np
    import torch

    from zorba_common.noise import _CHUNK, _MASK32, _mix32_, direction_keys, sign_table

    def rademacher(block: int, start: int, count: int) -> torch.Tensor:
        key_index, key_mix = direction_keys(run_seed, k, block)
        table = sign_table("cpu", torch.float32)
        byte_shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64)
        out = torch.empty(count, dtype=torch.float32)
        first_word, last_word = start // 32, (start + count + 31) // 32
        for word in range(first_word, last_word, _CHUNK):
            words = min(_CHUNK, last_word - word)
            x = torch.arange(word, word + words, dtype=torch.int64)
            x.mul_(0x2C1B3C6D).add_(key_index).bitwise_and_(_MASK32)
            _mix32_(x)
            x.bitwise_xor_(key_mix)
            _mix32_(x)
            byte_values = (x.unsqueeze(1) >> byte_shifts).bitwise_and_(0xFF).view(-1)
            signs = table.index_select(0, byte_values).view(-1)
            lo, hi = max(start, word * 32), min(start + count, (word + words) * 32)
            out[lo - start : hi - start] = signs[lo - word * 32 : hi - word * 32]
        return out

    def perturb(scale: float) -> None:
        scale = float(np.float32(scale))
        for block, tensors in blocks.items():
            start = 0
            for _, tensor in sorted(tensors, key=lambda item: item[0]):
                tensor.add_(rademacher(block, start, tensor.numel()).view(tensor.shape), alpha=scale)
                start += tensor.numel()

    with torch.no_grad():
        perturb(config.mu)
        plus = float(loss_fn(model, batch))
        perturb(-2.0 * config.mu)
        minus = float(loss_fn(model, batch))
        perturb(config.mu)
        grad = (plus - minus) / (2.0 * config.mu)
        perturb(-config.lr * grad)
    return grad


def evenly_spaced(count: int, total: int) -> list[int]:
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def review_batch(source):
    """BATCH_SIZE movie reviews cut to SEQ_LEN tokens, the same ones in every process."""
    import numpy as np

    from zorba_edge.data.collate import ClassificationCollator
    from zorba_edge.data.movie_reviews import load_movie_reviews
    from zorba_edge.data.templates import SENTIMENT_TEMPLATE

    reviews = load_movie_reviews()
    rng = np.random.default_rng(0)
    chosen = [reviews[i] for i in rng.choice(len(reviews), BATCH_SIZE, replace=False)]
    return ClassificationCollator(source.tokenizer(), SENTIMENT_TEMPLATE, seq_len=SEQ_LEN)(chosen)


def bf16_compare(args: argparse.Namespace) -> dict:
    """bf16 forward passes against fp32, every block loaded fp32, 8 of them assigned.

    Modes: fp32; `autocast` (torch.autocast to bf16 around the loss: weights stay fp32, matmuls
    run in bf16); `bf16_weights` (a copy of the model cast to bf16, perturbed in bf16 storage).
    Per mode and thread count: the median forward time, the modes interleaved within each
    repetition. Per mode (at --threads): the projected gradients (L+ - L-) / 2 mu, mu = 1e-3,
    along 8 directions, against fp32's: sum |g - g_fp32| / sum |g_fp32| and the share with
    the same sign, as `benchmarks/model_loading.py quant` measures frozen precisions.
    """
    import copy

    import torch

    from zorba_edge.engine.losses import classification_loss
    from zorba_edge.engine.zo import projected_gradient
    from zorba_edge.model.loading import LoadConfig, load_model
    from zorba_edge.model.sources import open_source

    source = open_source(args.model)
    assignment = evenly_spaced(8, source.config.num_hidden_layers)
    batch = review_batch(source)
    loaded = load_model(source, assignment, LoadConfig(frozen_dtype="fp32"))
    model = loaded.model.eval()
    blocks = {b: loaded.trainable_parameters(b) for b in assignment}
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    names = {id(p): n for n, p in model.named_parameters()}
    bf16_params = dict(bf16_model.named_parameters())
    bf16_blocks = {b: [(n, bf16_params[names[id(p)]]) for n, p in ts] for b, ts in blocks.items()}

    def autocast_loss(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return classification_loss(m, b).float()

    modes = {
        "fp32": (model, blocks, classification_loss),
        "autocast": (model, blocks, autocast_loss),
        "bf16_weights": (bf16_model, bf16_blocks, classification_loss),
    }
    results: dict[str, dict] = {mode: {} for mode in modes}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                for mode, (m, _, loss_fn) in modes.items():
                    t0 = time.perf_counter()
                    loss_fn(m, batch)
                    times[mode].append(time.perf_counter() - t0)
        for mode in modes:
            results[mode][f"forward_s_{threads}_threads"] = round(statistics.median(times[mode][1:]), 4)
    torch.set_num_threads(args.threads)
    reference = None
    for mode, (m, bl, loss_fn) in modes.items():
        gs = []
        for k in range(8):
            plus, minus = projected_gradient(m, bl, loss_fn, batch, 0, k, 1e-3)
            gs.append((plus - minus) / 2e-3)
        reference = reference or gs
        pairs = list(zip(gs, reference, strict=True))
        results[mode]["projected_grad"] = [round(g, 4) for g in gs]
        results[mode]["projected_grad_rel_err"] = round(
            sum(abs(g - r) for g, r in pairs) / sum(abs(r) for _, r in pairs), 4)
        results[mode]["projected_grad_same_sign"] = sum((g > 0) == (r > 0) for g, r in pairs) / 8
    return {
        "model": Path(args.model).name, "batch": f"{BATCH_SIZE}x{SEQ_LEN}", "assigned": len(assignment),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "modes": results,
        "command": "python benchmarks/zo_step.py --json --bf16",
    }


def worker(args: argparse.Namespace) -> Measurement:
    """One process: load, then either ZO steps (train) or forward passes (infer)."""
    import psutil
    import torch

    torch.set_num_threads(args.threads)
    from zorba_edge.client.memory_probe import PeakMemoryProbe
    from zorba_edge.engine.losses import classification_loss
    from zorba_edge.engine.snapshot import RoundSnapshot, Snapshot, SpilledSnapshot
    from zorba_edge.engine.zo import ZOConfig, one_sided_estimate, zo_step
    from zorba_edge.model.loading import LoadConfig, load_model, release_freed_memory
    from zorba_edge.model.sources import open_source

    source = open_source(args.model)
    num_blocks = source.config.num_hidden_layers
    assignment = evenly_spaced(args.assigned, num_blocks)
    # The batch is made before loading so that tokeniser and data are in both baselines.
    batch = review_batch(source)
    release_freed_memory()

    probe = PeakMemoryProbe("cpu")
    if not probe.exact:
        raise SystemExit("this benchmark needs Linux's resettable VmHWM (/proc/self/clear_refs)")
    probe.reset()
    start = time.perf_counter()
    loaded = load_model(source, assignment, LoadConfig(frozen_dtype=args.frozen))
    load_s = time.perf_counter() - start
    release_freed_memory()
    load_peak, steady = probe.peak_bytes(), psutil.Process().memory_info().rss
    model = loaded.model.eval()

    def forward() -> None:
        with torch.no_grad():
            classification_loss(model, batch)

    probe.reset()
    steps: dict[str, Callable[[int], object]] = {"forward": lambda k: forward()}
    if args.role == "train":
        blocks = {b: loaded.trainable_parameters(b) for b in assignment}
        snapshot: Snapshot = RoundSnapshot(blocks) if args.host_snapshot else SpilledSnapshot(blocks)
        config = ZOConfig(mu=1e-3, lr=1e-6)
        steps["step"] = lambda k: zo_step(model, blocks, classification_loss, batch, 0, k, config)
        n = ONE_SIDED_DIRECTIONS
        steps["one_sided"] = lambda k: one_sided_estimate(
            model, blocks, classification_loss, batch, 0, list(range(n * k + 1000, n * k + 1000 + n)), config)
        if not args.skip_before:
            steps["old_step"] = lambda k: legacy_zo_step(
                model, blocks, classification_loss, batch, 0, k, config)
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for k in range(args.repeats + 1):  # interleaved: a busy machine slows every path alike
        for name, run in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(k)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    components: dict[str, float | None] = {}
    if args.role == "train":
        components = move_components(blocks, args.repeats)
        snapshot.revert()
        snapshot.close()

    def median(name: str, table: dict[str, list[float]] = times) -> float | None:
        return statistics.median(table[name][1:]) if name in table else None

    return Measurement(
        role=args.role, assigned=len(assignment), frozen=args.frozen, load_s=load_s,
        load_peak_rss=load_peak, steady_rss=steady, phase_peak_rss=probe.peak_bytes(),
        forward_s=median("forward"), step_s=median("step"), old_step_s=median("old_step"),
        forward_cpu_s=median("forward", cpu_times), step_cpu_s=median("step", cpu_times),
        old_step_cpu_s=median("old_step", cpu_times),
        one_sided_s=median("one_sided"), one_sided_cpu_s=median("one_sided", cpu_times),
        **components,
    )


def move_components(blocks, repeats: int) -> dict[str, float]:
    """CPU seconds (medians after a warm-up) of a step's parts over the assigned blocks:
    hashing one direction, one move, its expansion alone, a difference move, the one-sided
    estimator's last move. Each part moves theta by +-1e-3 z at most and is undone by the
    round's revert."""
    import torch

    from zorba_edge.engine import directions
    from zorba_edge.engine.directions import Direction, Term, move_

    def expand_only(z: Direction) -> None:
        # The kernel's expansion (table rows, then the gather) over every chunk of every
        # tensor, its update left out (private names: this benchmark measures the kernel).
        largest = max(t.numel() for _, slots in z._layout for t, _ in slots)
        kernel = directions._Kernel(torch.device("cpu"), largest, False)
        step = 8 * directions._CHUNK_BYTES
        for index, (_, slots) in enumerate(z._layout):
            bits = z.block_bits(index)
            for tensor, start in slots:
                rows, table = kernel.rows(bits[start // 8 : (start + tensor.numel() + 7) // 8], None)
                for lo in range(start, start + tensor.numel(), step):
                    hi = min(lo + step, start + tensor.numel())
                    first, end = lo // 8 - start // 8, (hi + 7) // 8 - start // 8
                    torch.index_select(table, 0, rows[first:end], out=kernel.expanded[: end - first])

    n = ONE_SIDED_DIRECTIONS
    parts: dict[str, list[float]] = {name: [] for name in
                                     ("hash", "move", "expand", "difference", "local_step")}
    for k in range(repeats + 1):
        c0 = time.process_time()
        z = Direction(blocks, 0, 10_000 + k)
        c1 = time.process_time()
        z.add_(1e-3)
        c2 = time.process_time()
        expand_only(z)
        c3 = time.process_time()
        other = Direction(blocks, 0, 20_000 + k)
        c4 = time.process_time()
        move_([Term(1e-3, other, z)])
        c5 = time.process_time()
        move_([Term(1e-4, Direction(blocks, 0, 30_000 + i, held=False)) for i in range(n - 1)]
              + [Term(-1e-3, other)])
        c6 = time.process_time()
        for name, seconds in zip(parts, (c1 - c0, c2 - c1, c3 - c2, c5 - c4, c6 - c5), strict=True):
            parts[name].append(seconds)
    return {f"{name}_cpu_s": statistics.median(values[1:]) for name, values in parts.items()}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator to 3 decimals; None where either was not measured."""
    return None if numerator is None or not denominator else round(numerator / denominator, 3)


def run_worker(args: argparse.Namespace, role: str, assigned: int, frozen: str,
               host_snapshot: bool = False) -> Measurement:
    # The host-snapshot process is there for its peak only: one timed repetition.
    repeats = 1 if host_snapshot else args.repeats
    command = [
        sys.executable, __file__, "--worker", role, "--assigned", str(assigned), "--frozen", frozen,
        "--model", str(args.model), "--threads", str(args.threads), "--repeats", str(repeats),
        *(["--host-snapshot"] if host_snapshot else []),
        *(["--skip-before"] if args.skip_before or host_snapshot else []),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return Measurement(**json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory or .gguf (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions after one warm-up (default 5)")
    parser.add_argument("--assigned-counts", type=int, nargs="+", default=[1, 8, 30],
                        help="numbers of assigned blocks to measure (default 1 8 30)")
    parser.add_argument("--frozen-dtypes", nargs="+", default=["nf4", "fp32"],
                        help="frozen-block precisions to measure (default nf4 fp32)")
    parser.add_argument("--bf16", action="store_true",
                        help="measure bf16 forward passes against fp32 instead (see bf16_compare)")
    parser.add_argument("--worker", choices=["train", "infer"], help=argparse.SUPPRESS)
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--assigned", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--frozen", help=argparse.SUPPRESS)
    parser.add_argument("--skip-before", action="store_true",
                        help="do not time the legacy step (the `_before` figures; saves most of the time)")
    parser.add_argument("--host-snapshot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.model is None:
        from zorba_edge.model.pretrained import packaged_model_path

        args.model = packaged_model_path()
    if args.bf16:
        print(json.dumps(bf16_compare(args)))
        return
    if args.worker:
        args.role = args.worker
        print(json.dumps(asdict(worker(args))))
        return

    rows = []
    for frozen in args.frozen_dtypes:
        for assigned in args.assigned_counts:
            print(f"[zo_step] {assigned} blocks assigned, frozen {frozen}: training process...",
                  file=sys.stderr, flush=True)
            train = run_worker(args, "train", assigned, frozen)
            print("[zo_step]   ...training process, snapshot in host memory", file=sys.stderr, flush=True)
            host = run_worker(args, "train", assigned, frozen, host_snapshot=True)
            print("[zo_step]   ...inference process", file=sys.stderr, flush=True)
            infer = run_worker(args, "infer", assigned, frozen)
            row = {
                "assigned": train.assigned,
                "frozen": frozen,
                "forward_s": round(train.forward_s, 4),
                "step_s": round(train.step_s or 0.0, 4),
                "step_over_forward": round((train.step_s or 0.0) / train.forward_s, 3),
                "step_over_forward_before": ratio(train.old_step_s, train.forward_s),
                "step_over_forward_cpu": round((train.step_cpu_s or 0.0) / train.forward_cpu_s, 3),
                "step_over_forward_cpu_before": ratio(train.old_step_cpu_s, train.forward_cpu_s),
                "steps_per_s": round(1.0 / (train.step_s or float("inf")), 3),
                # Per reported scalar, against its floor (n + 1) / n forwards.
                "one_sided_scalar_over_forward": ratio(
                    (train.one_sided_s or 0.0) / ONE_SIDED_DIRECTIONS, train.forward_s),
                "one_sided_scalar_over_forward_cpu": ratio(
                    (train.one_sided_cpu_s or 0.0) / ONE_SIDED_DIRECTIONS, train.forward_cpu_s),
                "one_sided_floor": round((ONE_SIDED_DIRECTIONS + 1) / ONE_SIDED_DIRECTIONS, 3),
                # Where a step's time beyond its forwards goes, in forwards (CPU time): an
                # antithetic step hashes z once and moves theta three times.
                "hash_over_forward_cpu": ratio(train.hash_cpu_s, train.forward_cpu_s),
                "move_over_forward_cpu": ratio(train.move_cpu_s, train.forward_cpu_s),
                "expand_over_forward_cpu": ratio(train.expand_cpu_s, train.forward_cpu_s),
                "difference_over_forward_cpu": ratio(train.difference_cpu_s, train.forward_cpu_s),
                "local_step_over_forward_cpu": ratio(train.local_step_cpu_s, train.forward_cpu_s),
                "steps_per_s_before": ratio(1.0, train.old_step_s),
                "train_peak_mib": round(train.phase_peak_rss / 2**20, 1),
                "inference_peak_mib": round(infer.phase_peak_rss / 2**20, 1),
                "peak_over_inference": round(train.phase_peak_rss / infer.phase_peak_rss, 3),
                "peak_over_inference_host_snapshot": round(host.phase_peak_rss / infer.phase_peak_rss, 3),
                "load_s": round(train.load_s, 2),
                "load_peak_mib": round(train.load_peak_rss / 2**20, 1),
                "steady_mib": round(train.steady_rss / 2**20, 1),
                "load_peak_over_steady": round(train.load_peak_rss / train.steady_rss, 3),
            }
            rows.append(row)
            print(f"[zo_step]   {row}", file=sys.stderr, flush=True)

    def pick(assigned: int, frozen: str) -> dict | None:
        return next((r for r in rows if r["assigned"] == assigned and r["frozen"] == frozen), None)

    headline = pick(8, "nf4") or rows[0]
    summary = {
        "model": Path(args.model).name,
        "batch": f"{BATCH_SIZE}x{SEQ_LEN}",
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "step_over_forward": headline["step_over_forward"],
        "step_over_forward_max": max(r["step_over_forward"] for r in rows),
        "step_over_forward_before_max": max((r["step_over_forward_before"] or 0.0) for r in rows) or None,
        "peak_over_inference": headline["peak_over_inference"],
        "peak_over_inference_max": max(r["peak_over_inference"] for r in rows),
        "peak_over_inference_host_snapshot_max": max(r["peak_over_inference_host_snapshot"] for r in rows),
        "load_peak_over_steady": headline["load_peak_over_steady"],
        "table": rows,
        "command": "python benchmarks/zo_step.py --json",
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{'assigned':>8} {'frozen':>6} {'fwd s':>7} {'step s':>7} {'step/fwd':>8} {'before':>7} "
              f"{'train MiB':>9} {'infer MiB':>9} {'peak/inf':>8} {'load/steady':>11}")
        for r in rows:
            print(f"{r['assigned']:>8} {r['frozen']:>6} {r['forward_s']:>7.3f} {r['step_s']:>7.3f} "
                  f"{r['step_over_forward']:>8.3f} {r['step_over_forward_before'] or float('nan'):>7.3f} "
                  f"{r['train_peak_mib']:>9.1f} "
                  f"{r['inference_peak_mib']:>9.1f} "
                  f"{r['peak_over_inference']:>8.3f} {r['load_peak_over_steady']:>11.3f}")


if __name__ == "__main__":
    main()
