"""zorba-edge on Flower 1.42, measured on this machine (loopback only).

    python benchmarks/flower_run.py --json

1. Simulation Engine (Ray, in this process via flwr.simulation.run_simulation): the app on a
   tiny random model (built in code, saved to a temp dir), 2 virtual nodes with different
   budgets. Its alpha table is compared bit for bit with the same app driven in-process over
   a fake grid (no Flower at all), and with zorba-edge's own simulator (zorba_sim) on the same
   run, seeds, fleet and data (tests/flower_twin.py): `sim_alpha_equal`, and round by round
   how many published deltas agree.
   With `--model packaged` (or `--model PATH`) and `--data movie-reviews`, this half runs on
   a real model instead: the packaged SmolLM2-135M (`make models`) and a seeded subset of the
   movie reviews' training split (`--reviews`, written to a JSONL file both sides read), 2
   nodes with budgets of 1 and 3 blocks, frozen blocks fp32 on both sides (zorba_sim holds
   every block in fp32: a narrower frozen precision cannot match it), 4 steps of batch 4.
   The fake-grid driver then runs only where Ray and zorba_sim disagree (to tell which side
   differs): on a real model each run costs minutes. The deployment half always runs the
   tiny model.
2. Deployment Engine on 127.0.0.1: a SuperLink and 2 SuperNodes with different --node-config
   budgets run the app with `flwr run`; one SuperNode is killed mid-round; the SuperLink is
   killed mid-run and restarted, and a second `flwr run` resumes from the checkpoint.

Every process started here is stopped by its pid. Figures: rounds, the per-round overhead
(round wall time beyond the longest local training, median), the peak memory of each process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny model and data the tests build

ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
os.environ.update(ENV)

from client_support import make_world  # noqa: E402

RUN = {"run.pool-size": 16, "run.min-steps": 2, "run.max-steps": 2, "run.batch-size": 2,
       "run.seq-len": 16, "run.lr": 0.01, "run.memory-headroom": 0.0, "run.seed": 0}


REAL_RUN = {"run.pool-size": 16, "run.min-steps": 4, "run.max-steps": 4, "run.batch-size": 4,
            "run.seq-len": 48, "run.lr": 0.001, "run.memory-headroom": 0.0, "run.seed": 0}
"""A real model's run: min-steps = max-steps, so a node's measured step time (which the
engine books from its report) cannot change how many steps the next round asks for."""


def client_values(model: Path, data: Path) -> dict[str, Any]:
    # No peaks reported: the tiny model needs ~1 MiB by the memory model while its process
    # holds ~500 MiB of torch and Flower, so a calibration would exclude every node; on a real
    # model a measured peak varies from run to run, so a recalibration could change the
    # schedule of one side only.
    return {"client.model": str(model), "client.data": str(data),
            "client.frozen-dtype": "fp32", "client.runtime-mib": 0.0,
            "client.report-peak-memory": False}


def budgets_mib(model: Path, run: dict[str, Any], blocks: tuple[int, ...]) -> tuple[float, ...]:
    """Per node, the model's fixed part and its `blocks[i]` largest blocks, by its own fp32
    memory model (the tiny model's (1, 2): one block's worth and both blocks' worth)."""
    from zorba_common.memory_model import linear_memory_model
    from zorba_edge.client.assembly import footprint_of, memory_profile
    from zorba_edge.model.loading import LoadConfig
    from zorba_edge.model.sources import open_source

    settings = memory_profile(LoadConfig("fp32", "fp32"), 0).settings(run["run.batch-size"],
                                                                      run["run.seq-len"])
    model_bytes = linear_memory_model(footprint_of(open_source(model)), settings)
    largest = sorted(model_bytes.block_bytes, reverse=True)
    return tuple((model_bytes.fixed_bytes + sum(largest[:k])) / 2**20 + 0.01 for k in blocks)


@dataclass(frozen=True)
class SimSetup:
    """What the Simulation Engine half runs on."""

    model: Path
    data: Path
    """Classification JSONL lines: the nodes and zorba_sim split the same file."""
    run: dict[str, Any]
    budget_blocks: tuple[int, int]
    """How many blocks each node's budget holds (nodes of partitions 0 and 1)."""
    step_time_s: float
    """Declared, not measured, on both sides (client.step-time-s, zorba_sim's reference)."""
    round_duration_s: float
    """Long enough that no node is cut short by the deadline on a loaded machine."""
    heldout: list[Any]
    """Only zorba_sim's per-round evaluation reads these."""
    in_process_driver: bool
    """Always drive the app over the fake grid too (else only where Ray != zorba_sim)."""


def tiny_setup(world_dir: Path) -> SimSetup:
    from client_support import signal_examples

    return SimSetup(world_dir / "model", world_dir / "data.jsonl", RUN, (1, 2), 0.05, 120.0,
                    signal_examples(8, seed=1), in_process_driver=True)


def real_setup(root: Path, model: str, data: str, reviews: int) -> SimSetup:
    """The packaged SmolLM2-135M (or a model path) and `reviews` training reviews."""
    from client_support import write_jsonl

    from zorba_edge.client.assembly import MOVIE_REVIEWS, DataChoice, heldout_examples, training_examples
    from zorba_edge.model.pretrained import packaged_model_path

    if data != MOVIE_REVIEWS:
        raise SystemExit(f"--data {data}: only {MOVIE_REVIEWS} is supported with a real model")
    path = packaged_model_path() if model == "packaged" else Path(model).expanduser()
    # A seeded subset of the training split (held-out reviews excluded), as one file: the
    # nodes split it as they split any JSONL file, and zorba_sim reads the same lines.
    train = training_examples(DataChoice(MOVIE_REVIEWS, max_examples=reviews))
    heldout = heldout_examples(DataChoice(MOVIE_REVIEWS, max_examples=8))
    return SimSetup(path, write_jsonl(root / "reviews.jsonl", train), REAL_RUN, (1, 3), 5.0, 1800.0,
                    heldout, in_process_driver=False)


def own_simulator_check(loop: Any, values: dict[str, Any], budgets: tuple[float, ...],
                        heldout: list[Any]) -> dict[str, Any]:
    """zorba-edge's own simulator on the same run, seeds, fleet (partition i's budget) and data
    (tests/flower_twin.py), compared with the Flower run's table and published deltas."""
    from flower_twin import twin_simulation

    started = time.perf_counter()
    sim = twin_simulation(values, budgets, heldout)
    wall = time.perf_counter() - started
    ours, theirs = list(loop.engine.deltas), list(sim.engine.deltas)
    agree = 0
    while agree < min(len(ours), len(theirs)) and ours[agree] == theirs[agree]:
        agree += 1
    assert loop.engine.alpha is not None and sim.engine.alpha is not None
    return {"sim_alpha_equal": bool(np.array_equal(loop.engine.alpha, sim.engine.alpha)),
            "sim_rounds": [r.status for r in sim.records],
            "sim_deltas_equal": f"{agree} of {len(ours)}",
            "sim_alpha_max_abs_diff": float(np.abs(loop.engine.alpha - sim.engine.alpha).max()),
            # Equal tables of zeros would prove nothing: how much of the table moved.
            "alpha_nonzero": int(np.count_nonzero(loop.engine.alpha)),
            "alpha_max_abs": float(np.abs(loop.engine.alpha).max()),
            "zorba_sim_wall_s": round(wall, 2)}


# ------------------------------------------------------------------------------ simulation


def simulation(root: Path, setup: SimSetup, rounds: int) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from zorba_flower.client_app import make_client_app
    from zorba_flower.server_app import make_server_app

    budgets = budgets_mib(setup.model, setup.run, setup.budget_blocks)
    values = setup.run | client_values(setup.model, setup.data) | {
        "run.max-rounds": rounds, "run.min-clients": 2, "run.round-duration-s": setup.round_duration_s,
        "client.budgets-mib": ",".join(str(b) for b in budgets),
        "client.step-time-s": setup.step_time_s, "flower.checkpoint": str(root / "sim.ckpt")}
    seen: dict[str, Any] = {}
    started = time.perf_counter()
    # The actors get this process's environment: OMP_NUM_THREADS=1 (ENV), as zorba_sim here.
    run_simulation(make_server_app(values, lambda loop: seen.setdefault("loop", loop)),
                   make_client_app(values), num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2}})
    wall = time.perf_counter() - started
    loop = seen["loop"]
    out: dict[str, Any] = {
        "model": str(setup.model), "data": str(setup.data),
        "rounds": loop.engine.version, "wall_s": round(wall, 2),
        "budgets_mib": [round(b, 2) for b in budgets],
        "blocks_per_round": [{cid: sorted(b) for cid, b in sorted(r.assigned.items())}
                             for r in loop.rounds],
        "blocks_per_node": sorted(sorted(len(b) for b in r.assigned.values()) for r in loop.rounds)[0],
        "round_overhead_s": _median([r.overhead_s for r in loop.rounds]),
        "torch_threads_here": _torch_threads(),
    } | own_simulator_check(loop, values, budgets, setup.heldout)
    if setup.in_process_driver or not out["sim_alpha_equal"]:
        reference = in_process_alpha(root, values)
        out["alpha_equal_in_process_driver"] = bool(np.array_equal(loop.engine.alpha, reference))
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def in_process_alpha(root: Path, values: dict[str, Any]) -> np.ndarray:
    """The same app over a fake grid in this process (tests/flower_fakes.py), partitions
    assigned as the simulation assigns them."""
    from flower_fakes import FakeGrid, node_handler

    from zorba_flower.client_app import make_client_app
    from zorba_flower.server_loop import FlowerRounds, LoopSettings
    from zorba_flower.settings import server_config
    from zorba_server.engine import RoundEngine

    app = make_client_app(values)
    engine = RoundEngine(server_config(values))
    FlowerRounds(engine, LoopSettings(root / "ref.ckpt", "ref", max_idle_s=0.0)).run(
        FakeGrid({p + 1: node_handler(app, p + 1, {"partition-id": p, "num-partitions": 2})
                  for p in range(2)}))
    assert engine.alpha is not None
    return engine.alpha


# ------------------------------------------------------------------------------ deployment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Every process this benchmark starts, stopped by its pid (its children with it)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.peak_rss: dict[str, int] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def sample(self) -> None:
        """Peak RSS per role: the process itself, and its children (app processes)."""
        for name, proc in self.procs.items():
            try:
                p = psutil.Process(proc.pid)
                self._peak(name, p.memory_info().rss)
                for child in p.children(recursive=True):
                    role = f"{name}/{_role(child)}"
                    self._peak(role, child.memory_info().rss)
            except psutil.Error:
                continue

    def _peak(self, name: str, rss: int) -> None:
        self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the process's group (its pid: each starts its own session), which also
        reaches app processes whose parent already died."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        # Whatever of the group outlived its leader (a SuperExec, an app process).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def _role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "child"
    for role in ("flwr-serverapp", "flwr-clientapp", "flower-superexec", "flwr-simulation"):
        if role in cmd:
            return role
    return "child"


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    try:
        return msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except (OSError, ValueError):
        return None


def wait_for(cond: Callable[[], bool], timeout: float, procs: Processes, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        procs.sample()
        if cond():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def deployment(root: Path, world_dir: Path, rounds: int) -> dict[str, Any]:
    bin_dir = Path(sys.executable).parent
    home = root / "flwr-home"
    home.mkdir()
    link_port, node_ports = free_port(), (free_port(), free_port())
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    # The SuperLink and SuperNodes start flower-superexec and the app processes by name.
    env = dict(os.environ) | ENV | {"FLWR_HOME": str(home),
                                    "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs = Processes(root)
    ckpt = root / "deploy.ckpt"
    one, both = budgets_mib(world_dir / "model", RUN, (1, 2))
    values = RUN | client_values(world_dir / "model", world_dir / "data.jsonl") | {
        "run.max-rounds": rounds, "run.min-clients": 1, "run.round-duration-s": 90.0,
        "flower.checkpoint": str(ckpt), "flower.max-idle-s": 60.0,
        "flower.rounds-log": str(root / "timings.jsonl")}
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())

    def superlink() -> None:
        # A database keeps the node registry across a restart: with the default in-memory
        # state the restarted SuperLink answers the SuperNodes' heartbeats 401 and they quit.
        procs.start("superlink", [str(bin_dir / "flower-superlink"), "--insecure",
                                  "--host", "127.0.0.1", "--port", str(link_port),
                                  "--database", str(root / "superlink.db"),
                                  "--disable-runtime-dependency-installation"], env)

    def supernode(i: int, budget: float) -> None:
        procs.start(f"supernode-{i}", [
            str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
            "--host", "127.0.0.1", "--port", str(node_ports[i]),
            "--node-config", f"partition-id={i} num-partitions=2 budget-mib={budget}"], env)

    def flwr_run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / "flwr"), "run", str(REPO / "flower_app"), "loopback",
                               "--run-config", run_config], env=env, capture_output=True, text=True,
                              timeout=120)

    def version() -> int:
        state = read_checkpoint(ckpt)
        return int(state["version"]) if state else 0

    def open_round() -> int | None:
        state = read_checkpoint(ckpt)
        return state["open"]["round"] if state and state["open"] else None

    out: dict[str, Any] = {"errors": []}
    try:
        superlink()
        time.sleep(5)
        supernode(0, one)
        supernode(1, both)
        time.sleep(5)
        submitted = flwr_run()
        out["flwr_run_1"] = (submitted.stdout + submitted.stderr)[-600:]
        wait_for(lambda: version() >= 1, 600, procs, "the first applied round")
        # Kill the large node while round 2 is open: the small one goes on training.
        wait_for(lambda: open_round() is not None, 300, procs, "round 2 to open")
        procs.kill("supernode-1")
        out["killed_supernode_in_round"] = open_round()
        wait_for(lambda: version() >= 2, 600, procs, "a round applied without the killed node")
        wait_for(lambda: open_round() is not None, 300, procs, "the next round to open")
        before = version()
        out["superlink_killed_at_version"] = before
        procs.kill("superlink")
        superlink()
        time.sleep(10)
        if procs.procs["supernode-0"].poll() is not None:
            out["errors"].append("supernode-0 quit after the SuperLink restart; restarted it")
            procs.kill("supernode-0")
            supernode(0, one)
            time.sleep(5)
        submitted = flwr_run()
        out["flwr_run_2"] = (submitted.stdout + submitted.stderr)[-600:]
        wait_for(lambda: version() >= rounds, 900, procs, f"{rounds} applied rounds after the resume")
        state = read_checkpoint(ckpt)
        assert state is not None
        out["deployment_rounds"] = state["version"]
        out["round_statuses"] = [r["status"] for r in state["rounds"]]
        out["resumed_after_superlink_restart"] = bool(state["version"] > before and
                                                      "failed" in out["round_statuses"])
        out["blocks_per_round"] = [{cid: len(p[0]) for cid, p in r["plan"]["clients"].items()}
                                   for r in state["rounds"]]
    except Exception as exc:  # noqa: BLE001 (reported, not hidden: the JSON says what failed)
        out["errors"].append(f"{type(exc).__name__}: {exc}")
    finally:
        procs.sample()
        procs.stop_all()
        out["peak_rss_mib"] = {k: round(v / 2**20, 1) for k, v in sorted(procs.peak_rss.items())}
        out["round_overhead_s"] = deployment_overhead(root)
    return out


def deployment_overhead(root: Path) -> dict[str, Any] | None:
    """The server app's per-round lines (flower.rounds-log): wall time and node timings."""
    path = root / "timings.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {"median": _median([r["overhead_s"] for r in rows]), "rounds": rows}


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return round(statistics.median(xs), 3) if xs else None


def _exit_on_term(*_: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up short
    sys.exit(143)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--model", default="tiny", metavar="tiny|packaged|PATH",
                        help="the Simulation Engine half's model: the tests' tiny random model, "
                        "the packaged SmolLM2-135M (`make models`), or a model path (with "
                        "--data movie-reviews); the deployment half always runs the tiny model")
    parser.add_argument("--data", default="tiny", metavar="tiny|movie-reviews",
                        help="the tiny model's signal data, or movie reviews for a real model")
    parser.add_argument("--reviews", type=int, default=300,
                        help="movie-reviews: how many training reviews (a seeded subset)")
    args = parser.parse_args()
    if (args.model == "tiny") != (args.data == "tiny"):
        parser.error("--model tiny goes with --data tiny, a real model with --data movie-reviews")
    # A SIGTERM unwinds like an exception, so every started process is still stopped.
    signal.signal(signal.SIGTERM, _exit_on_term)
    root = Path(tempfile.mkdtemp(prefix="zorba-flower-"))
    world = make_world(root / "world")
    world_dir = world.model_dir.parent
    result: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()} "
                                         f"{os.cpu_count()} cpus (shared: timings unreliable)",
                              "command": " ".join(["python", *sys.argv]), "workdir": str(root),
                              "date": datetime.now(UTC).isoformat(timespec="seconds")}
    if not args.skip_simulation:
        try:
            setup = (tiny_setup(world_dir) if args.model == "tiny"
                     else real_setup(root, args.model, args.data, args.reviews))
            result["simulation"] = simulation(root, setup, args.rounds)
        except Exception as exc:  # noqa: BLE001
            result["simulation"] = {"error": f"{type(exc).__name__}: {exc}"}
    if not args.skip_deployment:
        signal.signal(signal.SIGTERM, _exit_on_term)  # Ray replaced it during the simulation
        result["deployment"] = deployment(root, world_dir, args.rounds + 1)
    sim, dep = result.get("simulation", {}), result.get("deployment", {})
    result |= {"sim_alpha_equal": sim.get("sim_alpha_equal"),
               "sim_deltas_equal": sim.get("sim_deltas_equal"),
               "sim_alpha_max_abs_diff": sim.get("sim_alpha_max_abs_diff"),
               "deployment_rounds": dep.get("deployment_rounds"),
               "resumed_after_superlink_restart": dep.get("resumed_after_superlink_restart"),
               "round_overhead_s": {"simulation": sim.get("round_overhead_s"),
                                    "deployment": (dep.get("round_overhead_s") or {}).get("median")},
               "peak_rss_mib": dep.get("peak_rss_mib")}
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
