"""The client daemon against the real server app, in process, with the real local trainer.

Each test runs `zorba_server`'s application on a local port and one or more `ClientDaemon`s
with `LocalTrainer`s on a tiny random Llama and a task whose label is a cue word, so the
loss can fall within a few rounds. The daemons talk HTTP exactly as the command does.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from aiohttp.test_utils import TestServer
from client_support import SECRET, free_port, signal_examples, tiny_text_config
from fixtures_text import make_tokenizer

from zorba_common.messages import DeviceProfile, RegisterRequest, RunInfo
from zorba_edge.client.assembly import check_run, footprint_of, memory_profile
from zorba_edge.client.backoff import Backoff
from zorba_edge.client.daemon import ClientDaemon, DaemonSettings, Listener, RoundSummary
from zorba_edge.client.errors import BudgetError, ServerRefusedError, UsageError
from zorba_edge.client.evaluation import RemoteTable, evaluate
from zorba_edge.client.local_task import LocalTask
from zorba_edge.client.modes import CLIENT_MODES
from zorba_edge.client.modes.fedavg import INITIAL_UPLOAD_S, WeightRounds
from zorba_edge.client.modes.fedavg_training import FedAvgTrainer
from zorba_edge.client.state import StateStore
from zorba_edge.client.trainer import LocalTrainer
from zorba_edge.client.transport import ServerClient
from zorba_edge.data.examples import GenerationExample
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.engine.losses import classification_loss
from zorba_edge.model.loading import LoadConfig
from zorba_edge.model.sources import RandomInitSource
from zorba_server.app import SERVICES, create_app
from zorba_server.config import config_from_dict

pytestmark = pytest.mark.asyncio
LOAD = LoadConfig(frozen_dtype="fp32")
BUDGET = 4 * 2**30
# lr 0.03 is a step chosen for the tiny random model to learn in a few rounds; the trust
# region (tested in test_estimators.py and test_loss_guard_sim.py) would shrink it, so it is
# off here: these tests are about the federation's plumbing learning, not the step's bound.
RUN_DEFAULTS = {"pool_size": 64, "lr": 0.03, "mu": 0.001, "batch_size": 8, "seq_len": 16,
                "round_duration_s": 20.0, "poll_timeout_s": 1.0, "max_steps": 8,
                "trust_radius": 0.0}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    # Several trainers share two cores here; spinning OpenMP threads would slow them ~20x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world() -> tuple[RandomInitSource, Any]:
    tokenizer = make_tokenizer()
    return RandomInitSource(tiny_text_config(tokenizer), seed=0, tokenizer=tokenizer), tokenizer


class Server:
    """The real server app on a fixed local port, restartable on the same port and database."""

    def __init__(self, db: Path, run: dict[str, Any]) -> None:
        self.db, self.run, self.port = db, RUN_DEFAULTS | run, free_port()
        self.http: TestServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Server:
        config = config_from_dict({"enrolment_secret": SECRET, "run": self.run,
                                   "storage": {"path": str(self.db), "synchronous": "normal"}})
        self.http = TestServer(create_app(config), port=self.port)
        await self.http.start_server()
        return self

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None

    @property
    def coordinator(self) -> Any:
        assert self.http is not None
        return self.http.app[SERVICES].running


@pytest_asyncio.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Server] = []

    async def start(name: str = "server", **run: Any) -> Server:
        server = await Server(tmp_path / f"{name}.sqlite3", run).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


class Recording(Listener):
    def __init__(self) -> None:
        self.rounds: list[RoundSummary] = []
        self.progressed: list[tuple[str, int, int]] = []

    def on_round(self, summary: RoundSummary) -> None:
        self.rounds.append(summary)

    def progress(self, what: str) -> Callable[[int, int], None]:
        return lambda done, total: self.progressed.append((what, done, total))

    def finished(self) -> list[str]:
        """The steps whose progress reached their total, in order."""
        return [what for what, done, total in self.progressed if done == total]


class SlowTask(LocalTask):
    """A task whose loss takes a while and says when training began: for stops mid-round."""

    started: threading.Event

    @property
    def loss_fn(self) -> Any:
        def slow(model: Any, batch: Any) -> torch.Tensor:
            self.started.set()
            threading.Event().wait(0.05)
            return classification_loss(model, batch)

        return slow


def make_task(world: Any, index: int, count: int, *, slow: bool = False) -> LocalTask:
    source, tokenizer = world
    examples = signal_examples()[index::count]
    task = (SlowTask if slow else LocalTask)(examples, tokenizer, seed=index)
    if slow:
        task.started = threading.Event()  # type: ignore[attr-defined]
    return task


# Building a model skeleton patches torch process-wide (transformers' init_empty_weights), so
# two trainers loading at once in one process would put each other's weights on the meta
# device. A real client is one trainer per process; here the in-process clients take turns.
MODEL_LOCK = threading.Lock()


class SerialTrainer:
    """A LocalTrainer whose calls hold MODEL_LOCK (see above)."""

    def __init__(self, inner: LocalTrainer) -> None:
        self.inner = inner

    @property
    def table(self) -> CoefficientTable:
        return self.inner.table

    def apply_deltas(self, deltas: Any, progress: Any = None) -> None:
        with MODEL_LOCK:
            self.inner.apply_deltas(deltas, progress)

    def replace_table(self, state: Any, progress: Any = None) -> None:
        with MODEL_LOCK:
            self.inner.replace_table(state, progress)

    def train_round(self, assignment: Any, cancel: threading.Event, on_step: Any = None) -> Any:
        with MODEL_LOCK:
            return self.inner.train_round(assignment, cancel, on_step)


class Device:
    """One client: its store, task, trainers and daemons, built as the command builds them."""

    def __init__(self, root: Path, world: Any, index: int, count: int, *, slow: bool = False,
                 budget_bytes: int = BUDGET) -> None:
        self.source = world[0]
        self.store = StateStore(root / f"client{index}" / "state.json")
        self.task = make_task(world, index, count, slow=slow)
        self.memory = memory_profile(LOAD, runtime_bytes=300 * 2**20)
        self.budget_bytes = budget_bytes
        self.registrations = 0
        self.trainers: list[LocalTrainer] = []
        self.listener = Recording()
        self.index = index

    def registration(self, progress: Any) -> RegisterRequest:
        self.registrations += 1
        progress(1, 1)  # the command's timing probe reports through it; none is run here
        profile = DeviceProfile("cpu", BUDGET, 0.01, len(self.task.examples),
                                footprint_of(self.source), self.source.fingerprint, self.memory,
                                name=f"dev{self.index}")
        return RegisterRequest(SECRET, profile)

    def trainer(self, run: RunInfo, table: CoefficientTable | None,
                progress: Any) -> SerialTrainer:
        made = LocalTrainer(self.source, LOAD, run, self.task, table=table)
        with MODEL_LOCK:
            made.hold((), progress)  # as the command's trainer loads: before the first round
        self.trainers.append(made)
        return SerialTrainer(made)

    def daemon(self, client: ServerClient, **settings: Any) -> ClientDaemon:
        return ClientDaemon(
            client, self.store, make_registration=self.registration, make_trainer=self.trainer,
            check_run=lambda run: check_run(run, self.source, self.memory, BUDGET),
            settings=DaemonSettings(budget_bytes=self.budget_bytes, **settings),
            listener=self.listener)

    async def run(self, url: str, *, backoff: Backoff | None = None, **settings: Any) -> Any:
        async with ServerClient(url, backoff=backoff or Backoff(0.05, max_s=0.5)) as client:
            return await self.daemon(client, **settings).run()


def count_state_fetches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The versions of every GET /v1/state the clients make from now on."""
    fetched: list[int] = []
    original = ServerClient.state

    async def counting_state(self: ServerClient) -> Any:
        state = await original(self)
        fetched.append(state.version)
        return state

    monkeypatch.setattr(ServerClient, "state", counting_state)
    return fetched


def server_alpha(server: Server) -> np.ndarray:
    return server.coordinator.engine.alpha.copy()


def saved_table(device: Device) -> CoefficientTable:
    state = device.store.load()
    assert state is not None
    table = device.store.load_table(state)
    assert table is not None
    return table


async def test_three_clients_federate_and_the_fine_tuned_loss_falls(
        tmp_path: Path, world: Any, servers: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = await servers(min_clients=3, min_reports=3, max_rounds=8)
    devices = [Device(tmp_path, world, i, 3) for i in range(3)]
    # One device declares a budget its rounds exceed: the daemon must say so.
    devices[2].budget_bytes = 1
    with caplog.at_level(logging.WARNING, logger="zorba_edge.client"):
        results = await asyncio.wait_for(
            asyncio.gather(*(d.run(server.url) for d in devices)), timeout=120)

    assert [r.reason for r in results] == ["finished"] * 3
    # The clients measure check losses: after 8 applied rounds a final check (one step each,
    # not applied) judges version 8 before the run finishes on it.
    assert server.coordinator.status()["rounds"][-1]["status"] == "checked"
    assert all(r.version == 8 and r.rounds_reported == 9 for r in results)
    alpha = server_alpha(server)
    assert np.abs(alpha).sum() > 0
    for device in devices:
        # Incremental syncs reproduce the server's table bit for bit, in memory and on disk.
        np.testing.assert_array_equal(device.trainers[-1].table.values, alpha)
        np.testing.assert_array_equal(saved_table(device).values, alpha)
        assert saved_table(device).version == 8
        assert [s.status for s in device.listener.rounds] == ["reported"] * 9
    assert sum("over the declared budget" in r.getMessage() for r in caplog.records) == 9

    source, tokenizer = world
    everything = LocalTask(signal_examples(), tokenizer)
    run = devices[0].store.load().run
    before = evaluate(source, LOAD, everything, batch_size=16, seq_len=16)
    after = evaluate(source, LOAD, everything, batch_size=16, seq_len=16,
                     remote=RemoteTable(CoefficientTable(64, 2, alpha, 8), run.seed, run.run_id))
    assert after.loss < before.loss - 0.02, (before, after)


async def test_a_stop_mid_round_abandons_it_reports_nothing_and_reverts_the_model(
        tmp_path: Path, world: Any, servers: Any) -> None:
    server = await servers(min_clients=1, max_steps=200, round_duration_s=60.0)
    device = Device(tmp_path, world, 0, 1, slow=True)
    async with ServerClient(server.url) as client:
        daemon = device.daemon(client)
        running = asyncio.ensure_future(daemon.run())
        # Its local steps have begun (the event, not a sleep): the stop lands mid-round.
        await asyncio.to_thread(device.task.started.wait, 30)  # type: ignore[attr-defined]
        daemon.request_stop()
        result = await asyncio.wait_for(running, timeout=30)

    assert result.reason == "stopped" and result.rounds_reported == 0
    assert [s.status for s in device.listener.rounds] == ["abandoned"]
    assert device.listener.rounds[0].steps < device.listener.rounds[0].planned_steps
    # It told the server it leaves: the round, whose only client it was, closes at once (an
    # event the driver acts on; waited for, not timed) with nothing reported or applied.
    while server.coordinator.engine.open is not None:
        await asyncio.sleep(0.01)
    status = server.coordinator.status()
    assert status["current_round"] is None and status["version"] == 0
    assert [(r["status"], r["reports"]) for r in status["rounds"]] == [("failed", 0)]
    # No longer counted active, without a membership timeout.
    assert [(c["active"], c["left"]) for c in status["clients"]] == [(False, True)]
    # The local steps were undone: the trained blocks hold base weights again (alpha is zero).
    trainer = device.trainers[0]
    assert trainer.loaded is not None and trainer.loaded.assignment
    for block in trainer.loaded.assignment:
        base = world[0].block_state_dict(block)
        for name, tensor in trainer.loaded.trainable_parameters(block):
            torch.testing.assert_close(tensor, base[name], rtol=0, atol=0)
    state = device.store.load()
    assert state is not None and state.client_id and state.alpha_sha256


async def test_a_restarted_client_rejoins_as_itself_from_its_saved_table(
        tmp_path: Path, world: Any, servers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await servers(min_clients=1, max_rounds=4)
    device = Device(tmp_path, world, 0, 1)
    first = await device.run(server.url, stop_after_rounds=2)
    assert first.reason == "rounds" and first.version == 1
    client_id = device.store.load().client_id

    fetched = count_state_fetches(monkeypatch)
    second = await device.run(server.url)
    assert second.reason == "finished" and second.version == 4
    assert device.registrations == 1 and device.store.load().client_id == client_id
    assert len(server.coordinator.engine.members) == 1
    assert fetched == []  # it resumed from its own table, no catch-up
    np.testing.assert_array_equal(saved_table(device).values, server_alpha(server))


async def test_a_client_far_behind_catches_up_from_the_whole_table(
        tmp_path: Path, world: Any, servers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await servers(min_clients=1, max_rounds=5, catch_up_rounds=1)
    device = Device(tmp_path, world, 0, 1)
    await device.run(server.url, stop_after_rounds=1)
    behind = tmp_path / "behind"
    shutil.copytree(device.store.path.parent, behind)
    await device.run(server.url, stop_after_rounds=3)
    # Four rounds applied; the copy stopped right after its first report, still at version 0.
    assert server.coordinator.engine.version == 4

    late = Device(tmp_path, world, 0, 1)
    late.store = StateStore(behind / "state.json")
    assert saved_table(late).version == 0
    fetched = count_state_fetches(monkeypatch)
    result = await late.run(server.url)
    assert result.reason == "finished" and result.version == 5
    assert fetched == [4]  # one catch-up, to the version the server was at
    np.testing.assert_array_equal(late.trainers[-1].table.values, server_alpha(server))
    # Its waits showed progress: loading (resuming, that replays alpha), then the rebuild.
    assert late.listener.finished() == ["loading the model", "catching up: rebuilding the blocks"]
    assert device.listener.finished()[:2] == ["timing probe (loading, then forward passes)",
                                              "loading the model"]


async def test_clients_survive_a_server_restart_and_finish_the_run(
        tmp_path: Path, world: Any, servers: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = await servers(min_clients=2, min_reports=2, max_rounds=6)
    devices = [Device(tmp_path, world, i, 2) for i in range(2)]
    running = [asyncio.ensure_future(d.run(server.url)) for d in devices]
    while server.coordinator.engine.version < 2:
        await asyncio.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="zorba_edge.client"):
        await server.stop()
        # Restarted once a client has found it gone (an event, not a second of wall time).
        while not any("server unreachable" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.05)
        await server.start()
        results = await asyncio.wait_for(asyncio.gather(*running), timeout=120)
    assert any("server unreachable" in r.getMessage() for r in caplog.records)
    assert [r.reason for r in results] == ["finished"] * 2
    assert all(d.registrations == 1 for d in devices)
    for device in devices:
        np.testing.assert_array_equal(saved_table(device).values, server_alpha(server))


async def test_a_server_that_forgot_the_client_gets_a_new_registration(
        tmp_path: Path, world: Any, servers: Any) -> None:
    server = await servers("old", min_clients=1, max_rounds=3)
    device = Device(tmp_path, world, 0, 1)
    await device.run(server.url, stop_after_rounds=1)
    old = device.store.load()
    await server.stop()
    server.db = tmp_path / "fresh.sqlite3"  # a new run on the same address
    await server.start()
    result = await device.run(server.url)
    new = device.store.load()
    assert result.reason == "finished" and device.registrations == 2
    assert new.client_id != old.client_id and new.run.run_id != old.run.run_id
    np.testing.assert_array_equal(saved_table(device).values, server_alpha(server))


async def test_an_unreachable_server_ends_the_daemon_after_the_give_up_time_and_keeps_the_state(
        tmp_path: Path, world: Any, servers: Any) -> None:
    server = await servers(min_clients=1, max_rounds=5)
    device = Device(tmp_path, world, 0, 1)
    await device.run(server.url, stop_after_rounds=1)
    before = (device.store.path.read_bytes(), device.store.table_path.read_bytes())
    await server.stop()
    from zorba_edge.client.errors import ServerUnavailableError

    with pytest.raises(ServerUnavailableError, match="gave up"):
        await device.run(server.url, backoff=Backoff(0.05, max_s=0.2, give_up_after_s=0.5))
    assert (device.store.path.read_bytes(), device.store.table_path.read_bytes()) == before


async def test_a_state_file_of_another_server_or_model_is_refused(
        tmp_path: Path, world: Any, servers: Any) -> None:
    server = await servers(min_clients=1, max_rounds=1)
    device = Device(tmp_path, world, 0, 1)
    await device.run(server.url)
    with pytest.raises(UsageError, match="belongs to a client of"):
        await device.run("http://127.0.0.1:1")
    run = device.store.load().run
    other = RandomInitSource(tiny_text_config(world[1]), seed=1, tokenizer=world[1])
    with pytest.raises(UsageError, match="--model"):
        check_run(run, other, device.memory, BUDGET)
    with pytest.raises(BudgetError, match="every block frozen"):
        check_run(run, world[0], device.memory, 10 * 2**20)


async def test_a_round_too_close_to_its_deadline_is_sat_out_without_polling_in_a_loop(
        tmp_path: Path, world: Any, servers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await servers(min_clients=1, round_duration_s=1.0)
    device = Device(tmp_path, world, 0, 1)
    polls: list[int] = []
    original = ServerClient.next_round

    async def counting_poll(self: ServerClient, version: int, wait_s: float) -> Any:
        polls.append(version)
        return await original(self, version, wait_s)

    monkeypatch.setattr(ServerClient, "next_round", counting_poll)
    async with ServerClient(server.url) as client:
        # Every assignment arrives with less time left than the margin the daemon keeps.
        daemon = device.daemon(client, deadline_margin_s=5.0)
        running = asyncio.ensure_future(daemon.run())
        # Two rounds sat out (the listener's events), however long the machine takes to them.
        while len(device.listener.rounds) < 2 and not running.done():
            await asyncio.sleep(0.05)
        daemon.request_stop()
        result = await asyncio.wait_for(running, timeout=60)
    statuses = [s.status for s in device.listener.rounds]
    assert result.rounds_reported == 0 and statuses and set(statuses) == {"skipped"}
    # Sitting each round out until its deadline: a few polls, not a storm.
    assert len(polls) <= 2 * len(statuses) + 2 and len(statuses) <= 4


async def test_a_client_ahead_of_a_restored_server_resyncs_to_the_servers_table(
        tmp_path: Path, world: Any, servers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await servers(min_clients=1, max_rounds=2)
    device = Device(tmp_path, world, 0, 1)
    await device.run(server.url)
    state = device.store.load()
    # The server was restored from an older backup: this client's table is "from the future".
    ahead = saved_table(device)
    ahead.values[0, 0] += 1.0
    ahead.version = 7
    device.store.save(state, ahead)
    fetched = count_state_fetches(monkeypatch)
    result = await device.run(server.url)
    assert result.reason == "finished" and fetched == [2]
    np.testing.assert_array_equal(saved_table(device).values, server_alpha(server))


async def test_a_refused_registration_ends_the_daemon_with_the_servers_reason(
        tmp_path: Path, world: Any, servers: Any) -> None:
    server = await servers(min_clients=1)
    device = Device(tmp_path, world, 0, 1)
    honest = device.registration

    def wrong_secret(progress: Any) -> RegisterRequest:
        return RegisterRequest("not-the-secret", honest(progress).profile)

    device.registration = wrong_secret  # type: ignore[method-assign]
    with pytest.raises(ServerRefusedError, match="wrong enrolment secret"):
        await device.run(server.url)
    assert not device.store.exists()


def answer_examples(count: int = 64, seed: int = 1) -> list[GenerationExample]:
    """Prompt/completion pairs whose answer the cue word decides: '... good ... Question :'
    -> 'yes', '... bad ...' -> 'no' (the collator appends EOS)."""
    return [GenerationExample(f"{e.text} Question :", "yes" if e.label else "no")
            for e in signal_examples(count, seed)]


async def test_a_generation_task_federates_and_its_held_out_completion_loss_falls(
        tmp_path: Path, world: Any, servers: Any) -> None:
    server = await servers(min_clients=2, min_reports=2, max_rounds=6)
    devices = [Device(tmp_path, world, i, 2) for i in range(2)]
    source, tokenizer = world
    train = answer_examples()
    for index, device in enumerate(devices):  # the command builds this task from a JSONL file
        device.task = LocalTask(train[index::2], tokenizer, template=None, seed=index)
        assert device.task.kind == "generation"
    results = await asyncio.wait_for(asyncio.gather(*(d.run(server.url) for d in devices)),
                                     timeout=120)
    assert [r.reason for r in results] == ["finished"] * 2
    assert all(s.status == "reported" for d in devices for s in d.listener.rounds)

    heldout = LocalTask(answer_examples(seed=2), tokenizer, template=None)
    run = devices[0].store.load().run
    alpha = server_alpha(server)
    remote = RemoteTable(CoefficientTable(64, 2, alpha, 6), run.seed, run.run_id)
    before = evaluate(source, LOAD, heldout, batch_size=16, seq_len=16)
    after = evaluate(source, LOAD, heldout, batch_size=16, seq_len=16, remote=remote)
    assert before.accuracy is None and before.perplexity == pytest.approx(np.exp(before.loss))
    assert after.loss < before.loss - 0.02, (before, after)


# ------------------------------------------------------------------ the fedavg run mode
# Its hooks download the round's weights before training and upload the trained ones before
# the report; the daemon is the same.


class StatusRecording(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []

    def on_status(self, text: str) -> None:
        self.statuses.append(text)


class FedAvgDevice(Device):
    """A Device whose trainer is the run mode's own, as the command builds it."""

    def trainer(self, run: RunInfo, table: CoefficientTable | None, progress: Any) -> Any:
        with MODEL_LOCK:
            made = CLIENT_MODES[run.mode].make_trainer(self.source, LOAD, run, self.task, table,
                                                       progress)
        self.trainers.append(made)
        return made


async def test_a_fedavg_client_downloads_trains_uploads_and_reports_each_round(
        tmp_path: Path, world: Any, servers: Any) -> None:
    server = await servers(mode="fedavg", min_clients=1, min_reports=1, max_rounds=3,
                           max_steps=2, lr=1e-3)
    device = FedAvgDevice(tmp_path, world, 0, 1)
    device.listener = StatusRecording()
    async with ServerClient(server.url, backoff=Backoff(0.05, max_s=0.5)) as client:
        daemon = device.daemon(client)
        result = await asyncio.wait_for(daemon.run(), timeout=120)
    hooks = daemon._hooks

    assert result.reason == "finished" and result.rounds_reported == 3
    assert [s.status for s in device.listener.rounds] == ["reported"] * 3
    statuses = device.listener.statuses
    # Round 1 starts from the base model it loaded; rounds 2 and 3 from the averaged uploads.
    assert [s for s in statuses if s.startswith("downloading")] == [
        "downloading the weights of version 1", "downloading the weights of version 2"]
    assert sum(s.startswith("uploading") for s in statuses) == 3
    trainer = device.trainers[-1]
    assert isinstance(trainer, FedAvgTrainer) and isinstance(hooks, WeightRounds)
    assert hooks.trainer is trainer and hooks.upload_s() != INITIAL_UPLOAD_S  # timed
