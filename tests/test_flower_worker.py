"""The node's long-lived worker (zorba_flower/worker.py) behind the per-message ClientApp, on
a tiny real model: the same rounds as in-process, the message's batch count honoured, clear
errors when the worker is missing or fails, and a forwarding ClientApp free of torch."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower app needs the `flower` extra (pip install -e '.[flower]')")

from client_support import make_world  # noqa: E402
from flower_fakes import FakeGrid, Handler, node_handler  # noqa: E402
from flwr.app import Context, Message, MessageType, RecordDict  # noqa: E402

from zorba_common.messages import Report
from zorba_flower import codec  # noqa: E402
from zorba_flower.client_app import make_client_app  # noqa: E402
from zorba_flower.client_worker import NodeWorker  # noqa: E402
from zorba_flower.server_loop import FlowerRounds, LoopSettings  # noqa: E402
from zorba_flower.settings import client_app_settings, server_config  # noqa: E402
from zorba_flower.worker import WorkerServer  # noqa: E402
from zorba_flower.worker_link import WorkerError, WorkerLink  # noqa: E402
from zorba_server.engine import RoundEngine  # noqa: E402
from zorba_server.rounds import APPLIED, CHECKED  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN = {"run.pool-size": 16, "run.max-rounds": 2, "run.min-clients": 2, "run.min-steps": 2,
       "run.max-steps": 2, "run.batch-size": 2, "run.seq-len": 16, "run.lr": 0.01,
       "run.round-duration-s": 120.0, "run.memory-headroom": 0.0}


@pytest.fixture(scope="module")
def values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    world_dir = make_world(tmp_path_factory.mktemp("world")).model_dir.parent
    return RUN | {"client.model": str(world_dir / "model"), "client.data": str(world_dir / "data.jsonl"),
                  "client.frozen-dtype": "fp32", "client.runtime-mib": 0.0,
                  "client.step-time-s": 0.05, "client.report-peak-memory": False,
                  "client.budget-mib": 1e6}


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # A Unix socket path must stay under ~104 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="zw-", dir="/tmp") as d:
        yield Path(d) / "node.sock"


@pytest.fixture
def worker(socket_path: Path) -> Iterator[WorkerServer]:
    server = WorkerServer(socket_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def run_two_nodes(tmp_path: Path, values: dict[str, Any], socket: Path | None,
                  replies: dict[int, list[Report]]) -> FlowerRounds:
    """Two nodes (each a fresh ClientApp per message, as the Deployment Engine starts one),
    both forwarding to the worker at `socket`, or (None) training in the ClientApp."""
    def node(n: int) -> Handler:
        config: dict[str, Any] = {"partition-id": n, "num-partitions": 2, "budget-mib": 1e6}
        if socket is not None:
            config["worker-socket"] = str(socket)
        state = RecordDict()  # one node's Flower state, kept across its messages

        def handle(msg: Message) -> RecordDict:
            # A fresh app per message: nothing but the node's state carries over.
            content = node_handler(make_client_app(values), n + 1, config, state)(msg)
            assert content is not None
            if msg.metadata.message_type == MessageType.TRAIN:
                answer = codec.read_train_reply(content)
                assert isinstance(answer, Report), answer
                replies.setdefault(n + 1, []).append(answer)
            return content

        return handle

    loop = FlowerRounds(RoundEngine(server_config(values)),
                        LoopSettings(tmp_path / "ckpt", "run", max_idle_s=0.0))
    loop.run(FakeGrid({n + 1: node(n) for n in range(2)}))
    return loop


def comparable(report: Report) -> Report:
    """A report less what is measured or random: the key and the step time."""
    return dataclasses.replace(report, idempotency_key="-", step_time_s=0.0)


@pytest.mark.slow
def test_rounds_through_the_worker_equal_the_in_process_rounds(
        tmp_path: Path, values: dict[str, Any], worker: WorkerServer, socket_path: Path) -> None:
    through, inside = {}, {}
    forwarded = run_two_nodes(tmp_path / "worker", values, socket_path, through)
    in_process = run_two_nodes(tmp_path / "in-process", values, None, inside)
    assert [r.status for r in forwarded.rounds] == [APPLIED, APPLIED, CHECKED]  # (the final check)
    # The worker did the work: it holds a trainer and both partitions' batch streams.
    assert worker.worker.trainer is not None and len(worker.worker.tasks) == 2
    for node in (1, 2):
        assert len(through[node]) == 3  # two rounds and the final check
        assert [comparable(r) for r in through[node]] == [comparable(r) for r in inside[node]]
    assert forwarded.engine.alpha is not None and np.count_nonzero(forwarded.engine.alpha) > 0
    assert np.array_equal(forwarded.engine.alpha, in_process.engine.alpha)
    assert forwarded.engine.deltas == in_process.engine.deltas


def first_train_instruction(tmp_path: Path, values: dict[str, Any]) -> codec.TrainInstruction:
    """The TRAIN message node 1 gets in round 1 of the two-node run."""
    grid = FakeGrid({n + 1: node_handler(make_client_app(values), n + 1,
                                         {"partition-id": n, "num-partitions": 2, "budget-mib": 1e6})
                     for n in range(2)})
    FlowerRounds(RoundEngine(server_config(values | {"run.max-rounds": 1})),
                 LoopSettings(tmp_path / "ckpt", "run", max_idle_s=0.0)).run(grid)
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN
            and m.metadata.dst_node_id == 1]
    return codec.read_train_instruction(sent[0].content)


def test_the_worker_seeks_to_the_batch_count_the_message_carries(
        tmp_path: Path, values: dict[str, Any], worker: WorkerServer, socket_path: Path) -> None:
    instruction = first_train_instruction(tmp_path, values)
    settings = client_app_settings(values, {"partition-id": 0, "num-partitions": 2,
                                            "budget-mib": 1e6})
    link = WorkerLink(socket_path)
    first = link.train(settings, instruction, 0)
    # The worker's own stream has moved on; a node whose state says 0 (a restarted
    # SuperNode) must get the same batches again, not the worker's next ones.
    again = link.train(settings, instruction, 0)
    later = link.train(settings, instruction, first.batches_drawn)
    reference = NodeWorker().train(settings, instruction, 0)
    assert isinstance(first.answer, Report) and isinstance(again.answer, Report)
    assert isinstance(later.answer, Report) and isinstance(reference.answer, Report)
    assert first.batches_drawn > 0 and again.batches_drawn == first.batches_drawn
    assert again.answer.steps == first.answer.steps == reference.answer.steps
    assert later.answer.steps != first.answer.steps
    assert later.batches_drawn == 2 * first.batches_drawn


def test_a_missing_worker_names_the_socket_and_the_command(
        values: dict[str, Any], socket_path: Path) -> None:
    query = FakeGrid({}).create_message(codec.profile_query(codec.ProfileQuery(2, 16)),
                                        MessageType.QUERY, 1, "profile")
    context = Context(run_id=1, node_id=1, node_config={"worker-socket": str(socket_path)},
                      state=RecordDict(), run_config={})
    with pytest.raises(WorkerError) as caught:
        make_client_app(values)(query, context)
    message = str(caught.value)
    assert str(socket_path) in message
    assert f"python -m zorba_flower.worker --socket {socket_path}" in message
    assert "remove worker-socket from the node config" in message


def test_a_failed_request_is_reported_and_the_worker_serves_on(
        values: dict[str, Any], worker: WorkerServer, socket_path: Path) -> None:
    link = WorkerLink(socket_path)
    missing = client_app_settings(values | {"client.model": "/nonexistent/model"}, {})
    with pytest.raises(WorkerError, match="failed the profile request: .*/nonexistent/model"):
        link.profile(missing, codec.ProfileQuery(2, 16))
    profile = link.profile(client_app_settings(values, {}), codec.ProfileQuery(2, 16))
    assert profile.num_samples > 0 and profile.step_time_s == 0.05


def test_a_forwarding_client_app_never_imports_torch() -> None:
    code = ("import sys, zorba_flower.client_app; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_worker_entry_point_serves_and_cleans_up_its_socket(
        values: dict[str, Any], socket_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "zorba_flower.worker", "--socket", str(socket_path)],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not socket_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        profile = WorkerLink(socket_path).profile(client_app_settings(values, {}),
                                                  codec.ProfileQuery(2, 16))
        assert profile.num_samples > 0
        assert os.stat(socket_path).st_mode & 0o077 == 0  # this user's only
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not socket_path.exists()
