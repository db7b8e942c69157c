"""What a Deployment Engine node pays per round for reloading, on the packaged SmolLM2-135M.

    python benchmarks/flower_reload.py --json [--repeats 3]

Flower 1.42's Deployment Engine starts a fresh `flwr-clientapp` process for every message,
which imports flwr, torch and transformers and builds the model anew from the history the
message carries (every published delta, replayed in place on base). This benchmark times
that in the same order, without a SuperLink:

1. Here: a one-node run of the app over the tests' fake grid (tests/flower_fakes.py), 2
   rounds, and the node's round-2 TRAIN message (a history of 1 delta) and Flower state are
   saved, as the SuperNode would hand them to the ClientApp process. The same process's
   round 2 is what a long-lived worker pays per round: it applies the one new delta in place
   instead of rebuilding. `recorded.in_process_rounds` splits each round's handler time into
   that in-place apply (`follow_in_place_s`), any replay from base (`replay_s`: the first
   load's, and narrow frozen blocks rebuilt when behind) and the local steps.
2. `--repeats` fresh `python` processes, each: import flwr's ClientApp, torch, transformers
   and `zorba_flower.client_app` (timed in that order; a module a later import shares with
   an earlier one is counted where first imported), then call the app on the message as
   the flwr-clientapp process does (`app(message, context)`), with timers around the
   handler's parts: open the model source, build the partition's task (examples, tokens,
   batch stream), load the model (skeleton, non-block weights, every block from base),
   replay the history (the in-place increments inside the load), and the local steps.
   The replay's cost per (pool index, block) entry of the history is given too: the history
   gains a round's entries every round.

Not in the figures: Flower's own process start (the SuperNode spawning flwr-clientapp, its
gRPC connection, pulling the message and pushing the reply); `python_start_s` is only the
interpreter's start. Timings are from a shared machine: orders of magnitude only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # before any heavy import: the child's clock starts here
REPO = Path(__file__).resolve().parents[1]
ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "TOKENIZERS_PARALLELISM": "false"}

RUN: dict[str, Any] = {
    "run.pool-size": 64, "run.min-steps": 4, "run.max-steps": 4, "run.batch-size": 2,
    "run.seq-len": 32, "run.lr": 0.001, "run.memory-headroom": 0.0, "run.seed": 0,
    "run.max-rounds": 2, "run.min-clients": 1, "run.round-duration-s": 600.0}
NODE = {"partition-id": 0, "num-partitions": 2, "budget-mib": 2048.0}


def client_values(model: str) -> dict[str, Any]:
    return {"client.model": model, "client.data": "movie-reviews", "client.frozen-dtype": "bf16",
            "client.step-time-s": 0.5, "client.report-peak-memory": False}


def time_calls(module: Any, name: str, phase: str, phases: dict[str, float]) -> None:
    """Replace `module.name` by the same function with a timer that adds to `phases[phase]`
    (what the caller looks up in that module's globals is what gets timed)."""
    wrapped = getattr(module, name)

    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return wrapped(*args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t0

    setattr(module, name, call)


# ------------------------------------------------------------------------------ parent


def record_round_two(out: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Run 2 rounds over the fake grid; save the node's last TRAIN message and its state."""
    sys.path.insert(0, str(REPO / "tests"))
    from flower_fakes import FakeGrid
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.common.serde import recorddict_to_proto

    from zorba_edge.client import trainer
    from zorba_edge.engine import coefficients
    from zorba_flower import history_trainer
    from zorba_flower.client_app import make_client_app
    from zorba_flower.server_loop import FlowerRounds, LoopSettings
    from zorba_flower.settings import server_config
    from zorba_server.engine import RoundEngine

    # follow() applies a new round in place through history_trainer's name for the function;
    # a replay from base (the first load, narrow frozen blocks) through coefficients' own.
    phases: dict[str, float] = {}
    time_calls(history_trainer, "apply_increments_", "follow_in_place_s", phases)
    time_calls(coefficients, "apply_increments_", "replay_s", phases)
    time_calls(trainer, "run_local_steps", "local_steps_s", phases)
    train_rounds: list[dict[str, float]] = []

    app = make_client_app(values)
    state = RecordDict()  # the node's Flower state, kept between messages as a SuperNode does

    def handle(msg: Message) -> RecordDict:
        train = msg.metadata.message_type == MessageType.TRAIN
        if train:
            # What the ClientApp process of this message would receive: message and state.
            (out / "state.bin").write_bytes(recorddict_to_proto(state).SerializeToString())
            (out / "message.bin").write_bytes(recorddict_to_proto(msg.content).SerializeToString())
        context = Context(run_id=1, node_id=1, node_config=NODE, state=state, run_config={})
        phases.clear()
        t0 = time.perf_counter()
        reply = app(msg, context)
        if train:
            train_rounds.append({"handler_s": round(time.perf_counter() - t0, 3)}
                                | {k: round(v, 3) for k, v in sorted(phases.items())})
        if reply.has_error():
            raise RuntimeError(f"the ClientApp answered an error: {reply.error}")
        return reply.content

    engine = RoundEngine(server_config(values))
    loop = FlowerRounds(engine, LoopSettings(out / "ckpt", "reload", max_idle_s=0.0))
    loop.run(FakeGrid({1: handle}))
    rounds = loop.rounds
    return {"rounds": [r.status for r in rounds], "version": engine.version,
            "blocks_trained": [len(r.assigned.get(1, ())) for r in rounds],
            "num_blocks": engine.alpha.shape[1] if engine.alpha is not None else None,
            "in_process_handler_s": [[round(t.handler_s, 3) for t in r.timings] for r in rounds],
            "in_process_rounds": train_rounds}


def run_child(out: Path, values: dict[str, Any]) -> dict[str, Any]:
    (out / "values.json").write_text(json.dumps(values))
    args = [sys.executable, str(Path(__file__).resolve()), "--child", str(out)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ) | ENV,
                          timeout=900, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the child process failed ({done.returncode}): {done.stderr[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    child["process_wall_s"] = round(wall, 3)
    child["python_start_s"] = round(wall - child.pop("script_s"), 3)
    return child


# ------------------------------------------------------------------------------ child


def child(out: Path) -> None:
    """One flwr-clientapp's worth of work, timed (see the module docstring)."""
    phases: dict[str, float] = {}

    def since(name: str, t0: float) -> float:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - t0
        return now

    t = since("script_start", STARTED)
    import flwr.app  # noqa: F401
    import flwr.clientapp  # noqa: F401
    t = since("import_flwr", t)
    import torch  # noqa: F401
    t = since("import_torch", t)
    import transformers  # noqa: F401
    t = since("import_transformers", t)
    import zorba_flower.client_app as client_app
    from zorba_edge.client import trainer
    from zorba_edge.engine import coefficients
    from zorba_flower import client_worker
    t = since("import_zorba_flower", t)

    def timed(module: Any, name: str, phase: str) -> None:
        time_calls(module, name, phase, phases)

    # The handler's parts, by the module globals it calls (timers only; the calls are the same).
    timed(client_worker, "open_source", "open_model_source")
    timed(client_worker, "training_examples", "task_examples")
    timed(client_worker, "build_task", "task_build")
    timed(trainer, "load_model", "load_model_total")
    timed(coefficients, "apply_increments_", "replay_history")
    timed(trainer, "run_local_steps", "local_steps")

    from flwr.app import Context, Message, MessageType, Metadata, RecordDict
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    def read(name: str) -> RecordDict:
        proto = RecordDictProto()
        proto.ParseFromString((out / name).read_bytes())
        return recorddict_from_proto(proto)

    values = json.loads((out / "values.json").read_text())
    meta = Metadata(1, "m", 0, 1, "", "2", 0.0, 600.0, MessageType.TRAIN)
    message = Message(metadata=meta, content=read("message.bin"))
    context = Context(run_id=1, node_id=1, node_config=NODE, state=read("state.bin"),
                      run_config=values)
    t0 = time.perf_counter()
    # make_client_app with the run's config, as the app's pyproject would give it.
    reply = client_app.make_client_app(values)(message, context)
    since("handler_total", t0)
    if reply.has_error():
        raise RuntimeError(f"the ClientApp answered an error: {reply.error}")
    from zorba_flower import codec

    timing = codec.read_timing(reply.content)
    result: dict[str, Any] = {k: round(v, 3) for k, v in phases.items()}
    replay_s = phases.get("replay_history", 0.0)
    result["load_model_base_s"] = round(phases["load_model_total"] - replay_s, 3)
    result["handler_other_s"] = round(phases["handler_total"] - sum(
        phases.get(k, 0.0) for k in ("open_model_source", "task_examples", "task_build",
                                     "load_model_total", "local_steps")), 3)
    result["reply_timing"] = None if timing is None else {
        "handler_s": round(timing.handler_s, 3), "train_s": round(timing.train_s, 3),
        "rss_peak_mib": round(timing.rss_peak_bytes / 2**20, 1)}
    instruction = codec.read_train_instruction(message.content)
    entries = sum(len(d.entries()) for d in instruction.deltas)
    result["history"] = {"version": len(instruction.deltas), "entries": entries,
                         "message_bytes": len(codec.encode(instruction)),
                         "replay_per_entry_s": round(replay_s / entries, 4) if entries else None}
    result["script_s"] = time.perf_counter() - STARTED
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes to time")
    parser.add_argument("--model", default=None, help="a model path (default: SmolLM2-135M)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    os.environ.update(ENV)
    from zorba_edge.model.pretrained import packaged_model_path

    model = args.model or str(packaged_model_path())
    out = Path(tempfile.mkdtemp(prefix="zorba-reload-"))
    values = RUN | client_values(model)
    started = time.perf_counter()
    recorded = record_round_two(out, values)
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]), "model": model,
        "machine": f"{os.uname().nodename} {os.cpu_count()} cpus (shared: timings unreliable)",
        "run": RUN, "node": NODE, "recorded": recorded,
        "record_s": round(time.perf_counter() - started, 1)}
    result["fresh_processes"] = [run_child(out, values) for _ in range(args.repeats)]
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
