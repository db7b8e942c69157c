"""Run one federation on this machine: a zorba-server and N `zorba-edge run` clients.

Every client is a real subprocess that talks HTTP to the real server through its own
counting proxy (byte_proxy.py). The run ends after `rounds` applied rounds (the server's
max_rounds) or, with a time limit, at the first round boundary after it.

At a time limit the server has usually opened the next round already. The clients are stopped
and leave; that round then closes at once, applied with the reports that came in before the
stop or failed without any. The run waits for that close before it reads the table, so the
live lines, the evaluated alpha version and the record's round counts tell the same story.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from zorba_common.run_defaults import (
    CPU_FROZEN_DTYPE,
    HARNESS_ROUND_S,
    QUICKSTART_MAX_STEPS,
    REVIEW_SEQ_LEN,
)
from zorba_lab.byte_proxy import CountingProxy, TrafficCount
from zorba_lab.processes import DemoError, Managed, offline_env, spawn, start_server
from zorba_server.config import AggregationConfig, RunConfig
from zorba_server.harness_config import harness_run
from zorba_server.round_status import APPLIED
from zorba_server.scheduler import SchedulerConfig

if TYPE_CHECKING:  # torch-free at import, so that --help answers at once
    from zorba_edge.client.evaluation import RemoteTable

SECRET = "quickstart-enrolment-secret"


@dataclass(frozen=True)
class ClientSetup:
    name: str
    budget_bytes: int


QUICKSTART_RUN = RunConfig(seq_len=REVIEW_SEQ_LEN, max_steps=QUICKSTART_MAX_STEPS,
                          round_duration_s=HARNESS_ROUND_S)
"""The server's run config with the quickstart's own defaults (zorba_common.run_defaults says
why). `run.max_rounds` is the applied rounds to run (0: until `minutes`)."""


@dataclass(frozen=True)
class FederationPlan:
    """What to run; the quickstart's CLI fills it. The run, aggregation and scheduler config
    are the server's, held and written to its TOML; the rest is the harness's own."""

    out_dir: Path
    clients: tuple[ClientSetup, ...]
    run: RunConfig = QUICKSTART_RUN
    aggregation: AggregationConfig = AggregationConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    data: str = "movie-reviews"
    minutes: float = 3.0
    """Training time limit when `run.max_rounds` is 0 (the run stops at the next round boundary)."""
    data_seed: int = 0
    dirichlet_alpha: float = 0.5
    heldout_fraction: float = 0.1
    threads: int = 1
    frozen_dtype: str = CPU_FROZEN_DTYPE
    """The clients' frozen blocks (`zorba-edge run --frozen-dtype`): the client processes run
    on this machine's CPU."""
    model: str | None = None
    labels: tuple[str, ...] | None = None
    """Label names of a JSONL classification file (None: negative,positive)."""
    extra_client_args: tuple[str, ...] = ()

    @classmethod
    def of(cls, out_dir: Path, clients: tuple[ClientSetup, ...], **values: Any) -> FederationPlan:
        """A plan from flat names (a command line's): run fields replace QUICKSTART_RUN's,
        `aggregation` names the rule."""
        run, aggregation, own = harness_run(values, QUICKSTART_RUN)
        return cls(out_dir, clients, run=run, aggregation=aggregation, **own)

    def server_toml(self, db_path: Path) -> str:
        # Every client of the plan takes part before the first round opens.
        run = dataclasses.replace(self.run, min_clients=len(self.clients))
        lines = [f'enrolment_secret = "{SECRET}"', "", "[storage]", f'path = "{db_path}"',
                 'synchronous = "normal"']
        for section, config, default in (("run", run, RunConfig()),
                                         ("aggregation", self.aggregation, AggregationConfig()),
                                         ("scheduler", self.scheduler, SchedulerConfig())):
            # What the plan sets apart from the server's defaults (an absent key is the
            # default); JSON scalars are TOML.
            lines += ["", f"[{section}]"]
            lines += [f"{f.name} = {json.dumps(getattr(config, f.name))}"
                      for f in dataclasses.fields(config)
                      if getattr(config, f.name) != getattr(default, f.name)]
        return "\n".join(lines) + "\n"

    def client_args(self, index: int, url: str, client_dir: Path, secret_file: Path) -> list[str]:
        c = self.clients[index]
        args = ["-m", "zorba_edge.client", "run", "--server", url, "--data", self.data,
                "--num-clients", str(len(self.clients)), "--client-index", str(index),
                "--dirichlet-alpha", str(self.dirichlet_alpha), "--data-seed", str(self.data_seed),
                "--heldout-fraction", str(self.heldout_fraction),
                "--memory-budget", f"{c.budget_bytes}B", "--state", str(client_dir / "state.json"),
                "--enrolment-secret-file", str(secret_file), "--name", c.name,
                "--threads", str(self.threads), "--frozen-dtype", self.frozen_dtype]
        if self.model is not None:
            args += ["--model", self.model]
        if self.labels is not None:
            args += ["--labels", ",".join(self.labels)]
        return args + list(self.extra_client_args)


@dataclass
class ClientRun:
    setup: ClientSetup
    process: Managed
    proxy: CountingProxy
    state_path: Path
    exit_code: int | None = None

    @property
    def traffic(self) -> TrafficCount:
        return self.proxy.count


@dataclass
class FederationResult:
    server_url: str
    db_path: Path
    clients: list[ClientRun]
    status: dict[str, Any]
    remote: RemoteTable | None
    wall_s: float
    train_s: float
    timeline: list[dict[str, Any]] = field(default_factory=list)
    """One entry per closed round, as the live lines showed it (RoundLines)."""


Progress = Callable[[str], None]


@dataclass
class RoundLines:
    """One live line per closed round, from the server's status as the polls see it:
    `round N STATUS R/A reports  loss L  alpha version V`, V being the version that round
    left (a poll may see several rounds close at once; each gets its own)."""

    progress: Progress
    started: float | None = None
    """When training started (time.monotonic()): lines say how long after it."""
    seen: set[int] = field(default_factory=set)
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def show(self, status: dict[str, Any], note: str = "") -> None:
        rounds = status.get("rounds", [])
        # The status lists the latest rounds and the current version: walking back from it,
        # each applied round published one version.
        version, left = status.get("version", 0), []
        for r in reversed(rounds):
            left.append(version)
            if r["status"] == APPLIED:
                version -= 1
        for r, after in zip(rounds, reversed(left), strict=True):
            if r["round"] in self.seen:
                continue
            self.seen.add(r["round"])
            elapsed = time.monotonic() - (self.started or time.monotonic())
            loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
            self.progress(f"[{elapsed:6.0f} s] round {r['round']:>3} {r['status']:<8} "
                          f"{r['reports']}/{r['assigned']} reports  loss {loss}  "
                          f"alpha version {after}{note}")
            self.timeline.append({"elapsed_s": elapsed, "round": r["round"], "status": r["status"],
                                  "loss": r["loss"], "version": after, "at_stop": bool(note)})


async def _status(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url + "/v1/status") as reply:
            return dict(await reply.json()) if reply.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


WhileServing = Callable[[str, list[ClientRun]], Awaitable[None]]
"""Work that needs the finished run's server (`zorba-edge export`, `eval --server`): called
with its URL and the stopped clients (their state files hold the tokens)."""


async def run_federation(plan: FederationPlan, progress: Progress = print,
                         while_serving: WhileServing | None = None) -> FederationResult:
    started = time.monotonic()
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    secret_file = out / "enrolment-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    db_path = out / "server.sqlite3"
    config_path = out / "server.toml"
    config_path.write_text(plan.server_toml(db_path))
    server, url = await start_server(config_path, out / "server.log")
    progress(f"server listening on {url} (log {out / 'server.log'})")
    clients: list[ClientRun] = []
    try:
        for i, setup in enumerate(plan.clients):
            proxy = CountingProxy(url)
            proxy_url = await proxy.start()
            client_dir = out / setup.name
            args = plan.client_args(i, proxy_url, client_dir, secret_file)
            process = await spawn(setup.name, args, client_dir / "client.log",
                                  offline_env(plan.threads))
            clients.append(ClientRun(setup, process, proxy, client_dir / "state.json"))
            progress(f"{setup.name}: budget {setup.budget_bytes / 2**30:.2f} GiB, "
                     f"log {client_dir / 'client.log'}")
        lines = RoundLines(progress)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            status, train_started = await _watch(plan, url, session, clients, server, lines)
            train_s = time.monotonic() - train_started
            # All at once: one by one, the clients still running could finish the abandoned
            # round and report while the first ones stop.
            codes = await asyncio.gather(*(c.process.stop() for c in clients))
            for c, code in zip(clients, codes, strict=True):
                c.exit_code = code
            status = await settle(url, session, server, lines, status)
            remote = await _fetch_table(url, clients)
            if while_serving is not None:
                await while_serving(url, clients)
    finally:
        for c in clients:
            await c.process.stop(timeout_s=5)
            await c.proxy.close()
        await server.stop()
    return FederationResult(url, db_path, clients, status, remote, time.monotonic() - started,
                            train_s, lines.timeline)


async def _fetch_table(url: str, clients: list[ClientRun]) -> RemoteTable | None:
    """The run's whole alpha table, with a client's token from its state file.

    Read here in one piece rather than with zorba_edge.client.evaluation.fetch_remote_table:
    its transport reads a body with a single `content.read(n)`, which returns only the bytes
    buffered so far, and a SmolLM2 table (K x 30 float64, 245 KB) arrives in several chunks.
    """
    from zorba_common.codec import decode
    from zorba_common.messages import AlphaState
    from zorba_edge.client.evaluation import RemoteTable
    from zorba_edge.client.state import StateStore
    from zorba_edge.engine.coefficients import CoefficientTable

    for c in clients:
        state = StateStore(c.state_path).load() if c.state_path.exists() else None
        if state is None:
            continue
        headers = {"Authorization": f"Bearer {state.token}", "Accept": "application/msgpack"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.get(url + "/v1/state", headers=headers) as reply:
                body = await reply.read()
                if reply.status != 200:
                    raise DemoError(f"GET /v1/state answered {reply.status}: {body[:200]!r}")
        alpha = decode(AlphaState, body, max_bytes=1 << 28)
        table = CoefficientTable(alpha.pool_size, alpha.num_blocks, alpha.matrix(), alpha.version)
        return RemoteTable(table, state.run.seed, alpha.run_id)
    return None


async def _watch(plan: FederationPlan, url: str, session: aiohttp.ClientSession,
                 clients: list[ClientRun], server: Managed,
                 lines: RoundLines) -> tuple[dict[str, Any], float]:
    """Poll the server until the run is over; print one line per closed round."""
    loop = asyncio.get_running_loop()
    progress = lines.progress
    train_started: float | None = None
    deadline = None
    status: dict[str, Any] = {}
    stop_after_version: int | None = None
    while True:
        await asyncio.sleep(1.0)
        for c in clients:
            c.process.sample_rss()
        if not server.running:
            raise DemoError(f"zorba-server died (exit code {server.process.returncode}: negative "
                            f"is a signal, -9 often the OOM killer); its log ends:\n{server.tail()}")
        alive = [c for c in clients if c.process.running]
        polled = await _status(session, url)
        if polled is not None:
            status = polled
        if train_started is None and status.get("current_round"):
            train_started = lines.started = time.monotonic()
            # A run of `rounds` rounds runs them all, however long they take (the baselines'
            # comparison needs equal rounds); the time limit is for `rounds` = 0.
            deadline = None if plan.run.max_rounds else loop.time() + plan.minutes * 60
            blocks = {c["name"]: c["blocks"] for c in status.get("clients", [])}
            progress("first round open; blocks per client: " + ", ".join(
                f"{name} {len(b)} ({_span(b)})" for name, b in blocks.items()))
        lines.show(status)
        if status.get("finished") or not alive:
            break
        if not status.get("current_round") and train_started is None:
            dead = [c for c in clients if not c.process.running]
            if dead:
                raise DemoError(f"{dead[0].setup.name} exited before the first round; its log "
                                f"ends:\n{dead[0].process.tail()}")
        # Past the time limit, stop once the round in progress has closed, so no trained
        # round is thrown away (the next one may already be open: it is abandoned).
        if deadline is not None and loop.time() >= deadline:
            if stop_after_version is None:
                stop_after_version = status.get("version", 0)
                if status.get("current_round"):
                    progress("time limit reached: waiting for the open round to close")
            if not status.get("current_round") or status.get("version", 0) > stop_after_version:
                progress("time limit reached: stopping the clients")
                break
    return status, train_started or time.monotonic()


SETTLE_GRACE_S = 10.0
"""Beyond the open round's deadline, how long to wait for the server to close it."""


async def settle(url: str, session: aiohttp.ClientSession, server: Managed, lines: RoundLines,
                  status: dict[str, Any], poll_s: float = 0.5) -> dict[str, Any]:
    """The server's status once the round open at the stop has closed (the clients left, so
    it closes at once; at its deadline at the latest), with a line for each round closed
    meanwhile. A round the server never closes stays open in the record: its blocks are left
    out of the figures and it counts as neither applied nor failed."""
    loop = asyncio.get_running_loop()
    give_up: float | None = None
    while True:
        polled = await _status(session, url)
        if polled is not None:
            status = polled
        lines.show(status, note="  (closed while the clients stopped)")
        current = status.get("current_round")
        if not current or not server.running:
            return status
        if give_up is None:
            give_up = loop.time() + float(current.get("deadline_in_s") or 0.0) + SETTLE_GRACE_S
        elif loop.time() >= give_up:
            lines.progress(f"round {current['round']} is still open {SETTLE_GRACE_S:.0f} s past "
                           "its deadline; reading the run as it is")
            return status
        await asyncio.sleep(poll_s)


def _span(blocks: list[int]) -> str:
    return f"{blocks[0]}-{blocks[-1]}" if blocks else "none"
