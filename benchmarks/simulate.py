"""The simulator's own costs: per step, per virtual client, per planned round; and whether its
runs are deterministic and resume exactly after a SIGKILL.

    python benchmarks/simulate.py --json                  # the tests' tiny model (seconds)
    python benchmarks/simulate.py --json --model smollm2  # the packaged SmolLM2-135M (minutes)

One JSON object on stdout (progress on stderr):
- sim_step_over_zo_step: a simulated round of one virtual client taking --steps steps, per step
  (planning, sizing messages, the client's loop with its batches, booking the report, closing
  the round, moving the model), over one bare `zo_step` on the same model and assigned blocks,
  taking the batches that round took (their lengths vary where the collator trims padding);
  the two are interleaved, medians of --repeats. Target <= 1.05;
  what stands between is mostly per round, and a real client pays it too (next figures);
- sim_loop_step_over_zo_step: the same, counting only what the round spends once per step
  inside the client's loop (its zo_steps, batches and loop_other phases below): what the
  simulator adds per step, with the once-a-round work (check forward, sync, snapshot) left out;
- sim_round_over_client_round: the same simulated round over a real client's local round
  (`LocalTrainer.apply_deltas` then `train_round`, what the daemon runs) on the same model,
  blocks, steps, task examples and check batch, timed in the same loop: what the simulator
  adds beyond the algorithm's own per-round costs (1.0: nothing);
- sim_round_split_s, client_round_split_s: each round's seconds by phase (medians): zo_steps,
  batches (collating each step's batch), check_forward (the loss guard's check batch),
  snapshot and revert (the exact round-end revert), release_memory (the heap trim), loop_other,
  sync (moving the model by the published increments), rest (the simulator: planning, messages,
  booking, closing; the client: `hold` and its peak-memory probe);
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
import dataclasses
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
    from zorba_sim.cli import settings_of

    base = {"model": model, "data": data, "rounds": 4, "batch_size": 8, "seq_len": 48,
            "pool_size": 1024, "max_steps": 4, "round_duration_s": 300.0, "eval_examples": 16,
            "eval_every": 1000, "reference_step_s": 1.0, "device": "cpu", "lr": 1e-4,
            # The bare step it is timed against is zo_step, the antithetic estimator's step
            # (two forwards, one direction): the simulated clients use the same.
            "estimator": "antithetic", "directions": 1}
    return settings_of(base | overrides)


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


PHASES = ("zo_steps", "batches", "check_forward", "snapshot", "revert", "release_memory",
          "loop_other", "sync", "rest")
"""A round's seconds, split: the estimator's steps; collating each step's batch; the check
batch's forward (the loss guard's); the round-start snapshot and the round-end revert;
handing freed memory back to the OS; the rest of `run_local_steps`; moving the model by the
published increments (the simulator's close, the client's `apply_deltas`); and the rest of
the round (the simulator: planning, sizing messages, booking the report, closing the round;
the client: `hold` and its peak-memory probe)."""


IN_LOOP_PER_STEP = ("zo_steps", "batches", "loop_other")
"""The phases a round spends once per step, inside the local loop: the rest is once a round."""


def round_split(seconds: dict[str, float], round_s: float) -> dict[str, float]:
    """One round's `PHASES` from the seconds of the timed calls (`local_loop`: the whole
    `run_local_steps`, and the phases measured inside it) and the round's wall time; the
    phases sum to `round_s`."""
    inside = ("zo_steps", "batches", "check_forward", "snapshot", "revert", "release_memory")
    split = {name: seconds.get(name, 0.0) for name in (*inside, "sync")}
    split["loop_other"] = seconds.get("local_loop", 0.0) - sum(split[n] for n in inside)
    split["rest"] = round_s - seconds.get("local_loop", 0.0) - split["sync"]
    return {name: split[name] for name in PHASES}


class PhaseClock:
    """Times the calls a round makes by wrapping the functions it calls (in this process
    only, undone by `close`): a few microseconds a call, next to rounds of milliseconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._undo: list[Any] = []
        self._inside: set[str] = set()

    def timed(self, name: str, fn: Any, unless_inside: str | None = None) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if unless_inside in self._inside:
                return fn(*args, **kwargs)
            self._inside.add(name)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                self._inside.discard(name)
        return call

    def patch(self, owner: Any, attribute: str, name: str, unless_inside: str | None = None) -> None:
        original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        self._undo.append((owner, attribute, original))
        setattr(owner, attribute, self.timed(name, getattr(owner, attribute), unless_inside))

    def install(self, sim: Any, trainer: Any) -> None:
        from zorba_edge.client import trainer as trainer_module
        from zorba_edge.client.local_task import LocalTask
        from zorba_sim import client_training

        for module in (trainer_module, client_training):
            self.patch(module, "run_local_steps", "local_loop")
        estimators = trainer_module.ESTIMATORS
        for key in list(estimators):
            self.patch_item(estimators, key, "zo_steps")
        self.patch(LocalTask, "next_batch", "batches")
        self.patch(LocalTask, "check_batch", "check_forward")
        loss_fn = LocalTask.__dict__["loss_fn"]
        self._undo.append((LocalTask, "loss_fn", loss_fn))
        clock = self
        LocalTask.loss_fn = property(  # type: ignore[method-assign,assignment]
            lambda task: clock.timed("check_forward", loss_fn.fget(task), unless_inside="zo_steps"))
        # The simulator's snapshot (host buffers) and a client's (spilled to disk) alike.
        for name in ("RoundSnapshot", "SpilledSnapshot"):
            self._undo.append((trainer_module, name, getattr(trainer_module, name)))
            setattr(trainer_module, name, self.timed_snapshot(getattr(trainer_module, name)))
        self.patch(trainer_module, "release_freed_memory", "release_memory")
        self.patch(sim.training, "close", "sync")
        self.patch(trainer, "apply_deltas", "sync")

    def timed_snapshot(self, snapshot: type) -> type:
        """`snapshot` with its taking timed as `snapshot` and its revert and close as `revert`."""
        clock = self

        class TimedSnapshot(snapshot):  # type: ignore[misc,valid-type]
            def __init__(self, *args: Any) -> None:
                clock.timed("snapshot", super().__init__)(*args)

            def revert(self) -> None:
                clock.timed("revert", super().revert)()

            def close(self) -> None:
                clock.timed("revert", super().close)()

        return TimedSnapshot

    def patch_item(self, mapping: dict[str, Any], key: str, name: str) -> None:
        self._undo.append((mapping, key, mapping[key]))
        mapping[key] = self.timed(name, mapping[key])

    def take(self) -> dict[str, float]:
        """The seconds since the last `take`."""
        seconds, self.seconds = self.seconds, {}
        return seconds

    def close(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            if isinstance(owner, dict):
                owner[attribute] = original
            else:
                setattr(owner, attribute, original)
        self._undo.clear()


def real_client(sim: Any, client: Any) -> Any:
    """A real client's `LocalTrainer` (what the daemon drives) over the simulation's model and
    run, with the simulated client's examples and task seed, every block held in fp32 like
    the simulator's, synced to the simulation's current version."""
    from zorba_edge.client.assembly import client_task_seed
    from zorba_edge.client.local_task import LocalTask
    from zorba_edge.client.trainer import LocalTrainer
    from zorba_edge.model.loading import LoadConfig

    task = LocalTask(client.task.examples, client.task.tokenizer, client.task.template,
                     seed=client_task_seed(sim.config.data_seed, 0))
    trainer = LocalTrainer(sim.source, LoadConfig(train_dtype="fp32", frozen_dtype="fp32",
                                                  device=sim.config.device),
                           sim.engine.run_info("benchmark-client"), task)
    trainer.apply_deltas(sim.engine.deltas_since(0)[0])
    return trainer


def client_round(trainer: Any, sim: Any, client_id: str, steps: int) -> None:
    """The daemon's local round after the simulation's last one: sync the new delta, then
    train on the simulated client's last assignment (moved to the synced version)."""
    import threading

    from zorba_edge.client.trainer import first_steps

    trainer.apply_deltas(sim.engine.deltas_since(trainer.table.version)[0])
    assignment = dataclasses.replace(sim.engine.last_plan.assignment_for(client_id, sim.clock),
                                     base_version=trainer.table.version)
    outcome = trainer.train_round(assignment, threading.Event(), first_steps(steps))
    if len(outcome.steps) != steps:
        raise RuntimeError(f"the real client took {len(outcome.steps)} steps, not {steps}")


def step_ratio(model: str, data: str, steps: int, repeats: int) -> dict[str, Any]:
    """A simulated round of one client with `steps` steps against bare zo_steps (per step)
    and against a real client's local round (whole rounds), interleaved; medians."""
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
    loss_fn = client.task.loss_fn
    config = ZOConfig(mu=run.mu, lr=run.lr, max_abs_grad=sim.config.server.aggregation.max_abs_scalar)
    trainer = real_client(sim, client)
    client_round(trainer, sim, client.client_id, steps)  # warm-up: loads the model
    clock = PhaseClock()
    clock.install(sim, trainer)
    # The bare steps take the very batches the simulated client just took: a collator that
    # trims padding makes batches of one task cost 10 to 48 tokens, so one fixed batch made
    # the ratio say as much about that batch's length as about the simulator.
    taken_batches: list[Any] = []
    next_batch = client.task.next_batch

    def recorded(batch_size: int, seq_len: int) -> Any:
        taken_batches.append(next_batch(batch_size, seq_len))
        return taken_batches[-1]

    client.task.next_batch = recorded  # type: ignore[method-assign]
    simulated, bare, real = [], [], []
    sim_splits, client_splits = [], []
    try:
        for r in range(repeats):
            clock.take()
            taken_batches.clear()
            started = time.perf_counter()
            sim.run_round()
            simulated.append(time.perf_counter() - started)
            sim_splits.append(round_split(clock.take(), simulated[-1]))
            started = time.perf_counter()
            client_round(trainer, sim, client.client_id, steps)
            real.append(time.perf_counter() - started)
            client_splits.append(round_split(clock.take(), real[-1]))
            batches = [b.to(sim.config.device) for b in taken_batches]
            started = time.perf_counter()
            for t, batch in enumerate(batches):
                zo_step(sim.loaded.model, blocks, loss_fn, batch, run.seed, r * steps + t, config)
            bare.append((time.perf_counter() - started) / len(batches))
    finally:
        clock.close()
        del client.task.next_batch
    sim_round_s, client_round_s = statistics.median(simulated), statistics.median(real)
    sim_split = median_split(sim_splits)
    in_loop_s = sum(sim_split[phase] for phase in IN_LOOP_PER_STEP)
    return {"sim_step_over_zo_step": sim_round_s / steps / statistics.median(bare),
            "sim_loop_step_over_zo_step": in_loop_s / steps / statistics.median(bare),
            "sim_round_over_client_round": sim_round_s / client_round_s,
            "sim_step_s": sim_round_s / steps, "zo_step_s": statistics.median(bare),
            "sim_round_s": sim_round_s, "client_round_s": client_round_s,
            "sim_round_split_s": sim_split,
            "client_round_split_s": median_split(client_splits),
            "steps_per_round": steps, "assigned_blocks": len(blocks_ids),
            "num_blocks": sim.loaded.num_blocks}


def median_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's median over the rounds (so the medians need not sum to the median round)."""
    return {name: statistics.median(s[name] for s in splits) for name in PHASES}


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
    from zorba_common.messages import DeviceProfile, MemoryProfile
    from zorba_edge.client.assembly import footprint_of, open_model
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    p.add_argument("--model", default="tiny",
                   help="tiny (the tests' 2-block Llama, default), smollm2 (the packaged "
                   "SmolLM2-135M; needs `make models`), or a model path (with --data)")
    p.add_argument("--data", default="movie-reviews", help="data for a --model path")
    p.add_argument("--clients", type=int, default=1000, help="virtual clients of the memory run")
    p.add_argument("--steps", type=int, default=8,
                   help="steps per timed round (default 8): the per-round costs weigh 1/steps "
                   "of sim_step_over_zo_step")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds of each kind (simulated, real client, bare zo_steps), "
                   "interleaved; the figures are medians (default 5)")
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
