"""A client refuses an assignment its memory budget cannot hold: it does not load the blocks,
says so in one line, sits the round out and goes on with the next round.

The server here is a script (a correct server never assigns more than a client's budget holds):
it assigns both blocks of a tiny Llama to a client whose budget holds one, then one block, then
ends the run. The client is the real daemon with the real local trainer."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from client_support import tiny_text_config
from fixtures_text import make_tokenizer
from test_client_daemon import Recording, make_task
from test_client_transport import msgpack_response

from zorba_common.codec import decode
from zorba_common.memory_model import (
    MEMORY_HEADROOM,
    client_memory_bytes,
    linear_memory_model,
    usable_budget,
)
from zorba_common.messages import (
    FINISHED,
    TRAIN,
    Assignment,
    DeviceProfile,
    HyperParams,
    NextRound,
    RegisterRequest,
    RegisterResponse,
    Report,
    ReportAck,
    RunInfo,
)
from zorba_edge.client.admission import AssignmentCheck
from zorba_edge.client.assembly import check_run, footprint_of, memory_profile
from zorba_edge.client.backoff import Backoff
from zorba_edge.client.daemon import ClientDaemon, DaemonSettings
from zorba_edge.client.errors import StateFileError
from zorba_edge.client.state import ClientState, StateStore
from zorba_edge.client.trainer import LocalTrainer
from zorba_edge.client.transport import ServerClient
from zorba_edge.engine.coefficients import CoefficientTable
from zorba_edge.model.loading import LoadConfig, LoadedModel
from zorba_edge.model.progress import Progress
from zorba_edge.model.sources import RandomInitSource

LOAD = LoadConfig(frozen_dtype="fp32")
HYPER = HyperParams(0.01, 0.001, 8, 16)
MEMORY = memory_profile(LOAD, runtime_bytes=4 * 2**30)
"""A runtime term far above what this process holds: a round's measured peak comes in under the
model, as a device's does where the server's calibration falls below 1."""


@pytest.fixture(scope="module")
def source() -> RandomInitSource:
    tokenizer = make_tokenizer()
    return RandomInitSource(tiny_text_config(tokenizer), seed=0, tokenizer=tokenizer)


def one_block_budget(source: RandomInitSource) -> int:
    """A declared budget whose usable part holds the model with one block trainable, not two."""
    model = linear_memory_model(footprint_of(source), MEMORY.settings(HYPER.batch_size, HYPER.seq_len))
    budget = math.ceil((model.fixed_bytes + max(model.block_bytes)) / (1 - MEMORY_HEADROOM)) + 1
    assert model.total((0, 1)) > usable_budget(budget) >= model.total((0,))
    return budget


def assignment(round_: int, blocks: tuple[int, ...], deadline_in_s: float) -> Assignment:
    ks = tuple(range(4 * round_, 4 * round_ + 4))
    return Assignment(round_, 0, blocks, ks, HYPER, deadline_in_s, 0.0)


class ScriptedServer:
    """Registers one client and answers its polls from a script; keeps the reports it gets."""

    def __init__(self, run: RunInfo, answers: Iterable[NextRound]) -> None:
        self.run = run
        self.answers = list(answers)
        self.reports: list[tuple[int, Report]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/clients", self.register)
        app.router.add_get("/v1/rounds/next", self.next_round)
        app.router.add_post("/v1/rounds/{round}/reports", self.report)
        return app

    async def register(self, request: web.Request) -> web.Response:
        decode(RegisterRequest, await request.read(), max_bytes=1 << 20)
        return msgpack_response(RegisterResponse("c-1", "tok", self.run), 201)

    async def next_round(self, request: web.Request) -> web.Response:
        return msgpack_response(self.answers.pop(0))

    async def report(self, request: web.Request) -> web.Response:
        report = decode(Report, await request.read(), max_bytes=1 << 20)
        round_ = int(request.match_info["round"])
        self.reports.append((round_, report))
        return msgpack_response(ReportAck(round_, report.idempotency_key, 1.7e9))


class HoldingTrainer(LocalTrainer):
    """A LocalTrainer that records every set of blocks it is asked to hold trainable."""

    held: list[tuple[int, ...]]

    def hold(self, blocks: Iterable[int], progress: Progress | None = None) -> LoadedModel:
        blocks = tuple(blocks)
        self.held.append(blocks)
        return super().hold(blocks, progress)


@pytest.mark.asyncio
async def test_an_assignment_over_the_budget_is_declined_unloaded_and_the_next_round_runs(
        tmp_path: Path, source: RandomInitSource, caplog: pytest.LogCaptureFixture) -> None:
    budget = one_block_budget(source)
    run = RunInfo("run-1", 7, 64, 2, source.fingerprint, HYPER, 30.0, 1.0, 1e6)
    server = ScriptedServer(run, [
        NextRound(TRAIN, 0, assignment(1, (0, 1), deadline_in_s=0.5)),  # more than it holds
        NextRound(TRAIN, 0, assignment(2, (0,), deadline_in_s=120.0)),
        # Once a peak under the model is acknowledged, the server's calibration is at most that
        # ratio, and a plan of both blocks at it fits: the client takes it.
        NextRound(TRAIN, 0, assignment(3, (0, 1), deadline_in_s=120.0)),
        NextRound(FINISHED, 0, reason="done"),
    ])
    task = make_task((source, source.tokenizer()), 0, 1)
    trainers: list[HoldingTrainer] = []

    def make_trainer(run: RunInfo, table: CoefficientTable | None, progress: Any) -> HoldingTrainer:
        trainer = HoldingTrainer(source, LOAD, run, task, table=table)
        trainer.held = []
        trainer.hold(())  # as the command's trainer loads: every block frozen
        trainers.append(trainer)
        return trainer

    def registration(progress: Any) -> RegisterRequest:
        return RegisterRequest("secret", DeviceProfile(
            "cpu", budget, 0.01, len(task.examples), footprint_of(source), source.fingerprint,
            MEMORY))

    check = AssignmentCheck(footprint_of(source), MEMORY, budget)
    listener = Recording()
    store = StateStore(tmp_path / "state.json")
    http = TestServer(server.app())
    await http.start_server()
    try:
        async with ServerClient(str(http.make_url("/")), backoff=Backoff(0.01, max_s=0.05)) as client:
            daemon = ClientDaemon(
                client, store, make_registration=registration, make_trainer=make_trainer,
                check_run=lambda run: check_run(run, source, MEMORY, budget),
                settings=DaemonSettings(budget_bytes=budget), listener=listener,
                check_memory=lambda run: check)
            with caplog.at_level(logging.WARNING, logger="zorba_edge.client"):
                result = await asyncio.wait_for(daemon.run(), timeout=120)
    finally:
        await http.close()

    # The run went on past the declined round: rounds 2 and 3 trained and reported.
    assert result.reason == "finished" and result.rounds_reported == 2
    assert [(s.round, s.status) for s in listener.rounds] == [
        (1, "declined"), (2, "reported"), (3, "reported")]
    assert [r for r, _ in server.reports] == [2, 3]
    # Round 1's blocks were never loaded trainable: the trainer held nothing, then round 2's
    # block, then round 3's two.
    assert [t.held for t in trainers] == [[(), (0,), (0, 1)]]
    declined = [r.getMessage() for r in caplog.records if "declined" in r.getMessage()]
    assert len(declined) == 1
    need = client_memory_bytes(footprint_of(source), MEMORY.settings(8, 16), (0, 1))
    for part in ("round 1 declined", "blocks [0, 1]", f"{need:,} bytes",
                 f"{usable_budget(budget):,} bytes", "holds 1 blocks at once", "not loading"):
        assert part in declined[0], (part, declined[0])
    # The reported rounds' smallest peak / model ratio is the floor the checks use, kept.
    ratios = [check.peak_ratio(assignment(s.round, s.blocks, 1.0), s.peak_memory_bytes)
              for s in listener.rounds[1:]]
    assert 0 < ratios[0] < 1
    assert check.refusal(assignment(3, (0, 1), 1.0), ratios[0]) is None
    state = store.load()
    assert state is not None and state.memory_floor == min(ratios)


def test_the_check_takes_the_servers_rule_at_the_calibration_floor(source: RandomInitSource) -> None:
    budget = one_block_budget(source)
    check = AssignmentCheck(footprint_of(source), MEMORY, budget)
    assert check.refusal(assignment(1, (0,), 10.0), 1.0) is None
    assert check.refusal(assignment(1, (0, 1), 10.0), 1.0) is not None
    assert check.refusal(assignment(1, (0, 0), 10.0), 1.0) is None  # a block counts once
    # A block that does not exist is the trainer's to refuse (AssignmentError), not this check's.
    assert check.refusal(assignment(1, (5,), 10.0), 1.0) is None
    # Where the client's acknowledged peaks came in under the model, the server plans it with a
    # calibration at least that low, and may fit both blocks: the check then takes them.
    settings = MEMORY.settings(HYPER.batch_size, HYPER.seq_len)
    both = client_memory_bytes(footprint_of(source), settings, (0, 1))
    floor = usable_budget(budget) / both
    assert check.refusal(assignment(1, (0, 1), 10.0), floor) is None
    assert check.refusal(assignment(1, (0, 1), 10.0), floor * 1.001) is not None
    assert check.peak_ratio(assignment(1, (0, 1), 10.0), both // 2) == pytest.approx(0.5, rel=1e-6)


def test_the_floor_is_kept_with_the_state_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    run = RunInfo("run-1", 7, 64, 2, "fp", HYPER, 30.0, 1.0, 1e6)
    store.save(ClientState("http://127.0.0.1:1", "c-1", "tok", run, memory_floor=0.93))
    loaded = StateStore(store.path).load()
    assert loaded is not None and loaded.memory_floor == 0.93
    text = store.path.read_text().replace('"memory_floor": 0.93', '"memory_floor": 1.5')
    store.path.write_text(text)
    with pytest.raises(StateFileError, match="memory_floor"):
        StateStore(store.path).load()
