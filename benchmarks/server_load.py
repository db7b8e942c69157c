"""Load test of zorba-server: N simulated clients register, long-poll and report on loopback.

    python benchmarks/server_load.py --json
    python benchmarks/server_load.py --clients 1000 --rounds 10 --steps 16

The server runs as a subprocess (`python -m zorba_server`, storage.synchronous = full, so
every acknowledged report has been fsynced) pinned to one core; the clients run in this
process on another core, each with its own keep-alive connection, through a minimal
HTTP/1.1 client (aiohttp's client costs more CPU per request than the server, and would
measure itself). One round = every client polls for its assignment and posts one report
of `--steps` (k, g) scalars; the round closes when all have reported.

Figures:
  reports_per_s  reports acknowledged in the measured rounds / their wall time, from the
                 first assignment of the first measured round to the last ack of the last
                 (polls, round closes and aggregation included);
  p50_ms, p99_ms latency of POST /v1/rounds/{r}/reports, measured rounds only;
  poll_p99_ms    latency of the long-poll answers that carried an assignment.
  server_cpu_s   the server process's CPU time (user + system) from before the first
                 registration to the end of the last round: divided by `reports`, the
                 figure that load on the machine barely changes (wall time it does).
Bounded: `--rounds` rounds after `--warmup` rounds, and a hard `--timeout-s`.
`--profile FILE` runs the server under cProfile (`python -m pstats FILE` reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import psutil

from zorba_common.codec import CONTENT_TYPE, decode, encode
from zorba_common.memory_model import ModelFootprint
from zorba_common.messages import DeviceProfile, NextRound, RegisterRequest, RegisterResponse, Report

SECRET = "benchmark-enrolment-secret"
FINGERPRINT = "bench-30-blocks"
# A 30-block model of ~1.8M parameters a block (SmolLM2-135M-like sizes).
FOOTPRINT = ModelFootprint(
    block_params=(1_770_000,) * 30, quantizable_block_params=(1_769_000,) * 30,
    embed_head_params=28_311_552, hidden_size=576, vocab_size=49_152, num_layers=30,
    intermediate_size=1536,
)
BIG = 1 << 40


class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it are sequential."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        for attempt in range(50):
            try:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                return
            except OSError:
                await asyncio.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"cannot connect to {self.host}:{self.port}")

    async def request(self, method: str, path: str, body: bytes = b"",
                      token: str | None = None) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                f"Content-Length: {len(body)}"]
        if body:
            head.append(f"Content-Type: {CONTENT_TYPE}")
        if token:
            head.append(f"Authorization: Bearer {token}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Stats:
    warmup: int
    report_latency: list[float] = field(default_factory=list)
    poll_latency: list[float] = field(default_factory=list)
    reports: int = 0
    first_measured: float | None = None
    last_ack: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def simulated_client(index: int, host: str, port: int, steps: int, stats: Stats,
                           registered: asyncio.Semaphore) -> None:
    conn = Connection(host, port)
    async with registered:  # bounded burst of connects and registrations
        await conn.open()
        profile = DeviceProfile("cpu", 8 * 2**30, 0.001, 100 + index, FOOTPRINT, FINGERPRINT,
                                name=f"sim{index}")
        status, body = await conn.request("POST", "/v1/clients",
                                          encode(RegisterRequest(SECRET, profile)))
        if status != 201:
            raise RuntimeError(f"registration refused: {msgpack.unpackb(body)}")
        token = decode(RegisterResponse, body, max_bytes=BIG).token
    rng = random.Random(index)
    version = 0
    try:
        while True:
            started = time.perf_counter()
            status, body = await conn.request("GET", f"/v1/rounds/next?version={version}&wait=30",
                                              token=token)
            if status != 200:
                stats.error(f"poll {status}")
                await asyncio.sleep(0.1)
                continue
            answer = decode(NextRound, body, max_bytes=BIG)
            if answer.catch_up:
                version = answer.version  # a real client would fetch /v1/state here
            elif answer.deltas:
                version = answer.deltas[-1].version
            if answer.status == "finished":
                return
            if answer.status != "train":
                continue
            a = answer.assignment
            measured = a.round > stats.warmup
            now = time.perf_counter()
            if measured:
                stats.poll_latency.append(now - started)
                if stats.first_measured is None:
                    stats.first_measured = now
            report = Report(uuid.uuid4().hex, a.base_version,
                            tuple((k, rng.uniform(-1, 1)) for k in a.pool_indices[:steps]),
                            8, 2.0, 1.9, 0, 0.001)
            started = time.perf_counter()
            status, body = await conn.request("POST", f"/v1/rounds/{a.round}/reports",
                                              encode(report), token=token)
            done = time.perf_counter()
            if status != 200:
                stats.error(f"report {status} {msgpack.unpackb(body).get('error')}")
                continue
            if measured:
                stats.report_latency.append(done - started)
                stats.reports += 1
                stats.last_ack = max(stats.last_ack, done)
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def start_server(workdir: Path, args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    config = workdir / "server.toml"
    config.write_text("\n".join([
        f'enrolment_secret = "{SECRET}"',
        "[storage]", f'path = "{workdir / "bench.sqlite3"}"', f'synchronous = "{args.sync}"',
        "[run]", f"min_clients = {args.clients}", f"min_reports = {args.clients}",
        f"max_rounds = {args.warmup + args.rounds}", "round_duration_s = 120.0",
        f"max_steps = {args.steps}", f"min_steps = {args.steps}", "poll_timeout_s = 30.0",
        "pool_size = 1024", "lr = 1e-6",
    ]) + "\n")
    server_cores = {args.server_core}

    def pin() -> None:
        os.sched_setaffinity(0, server_cores)
        raise_fd_limit(4 * args.clients + 256)

    # --profile: the server under cProfile, which writes its stats when SIGTERM stops it.
    profiler = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
    proc = subprocess.Popen(
        [sys.executable, *profiler, "-m", "zorba_server", "--config", str(config),
         "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=(workdir / "server.log").open("wb"), preexec_fn=pin)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        proc.kill()
        log = (workdir / "server.log").read_text()[-2000:]
        raise RuntimeError(f"server failed to start: {log}")
    return proc


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="zorba-bench-") as tmp:
        proc = start_server(Path(tmp), args, port)
        stats = Stats(warmup=args.warmup)
        started = time.perf_counter()
        own_cpu = time.process_time()
        server = psutil.Process(proc.pid)
        server_cpu = sum(server.cpu_times()[:2])
        try:
            gate = asyncio.Semaphore(100)
            clients = [simulated_client(i, "127.0.0.1", port, args.steps, stats, gate)
                       for i in range(args.clients)]
            await asyncio.wait_for(asyncio.gather(*clients), args.timeout_s)
            server_cpu = sum(server.cpu_times()[:2]) - server_cpu
        finally:
            proc.terminate()
            proc.wait(30)
        total = time.perf_counter() - started
        own_cpu = time.process_time() - own_cpu
    span = stats.last_ack - (stats.first_measured or stats.last_ack)
    return {
        "clients": args.clients,
        "rounds": args.rounds,
        "steps_per_report": args.steps,
        "reports": stats.reports,
        "reports_per_s": round(stats.reports / span, 1) if span > 0 else None,
        "p50_ms": round(1000 * percentile(stats.report_latency, 50), 2),
        "p99_ms": round(1000 * percentile(stats.report_latency, 99), 2),
        "poll_p99_ms": round(1000 * percentile(stats.poll_latency, 99), 2),
        "errors": stats.errors,
        "wall_s": round(total, 2),
        "server_cpu_s": round(server_cpu, 2),
        "server_cpu_ms_per_report": round(1000 * server_cpu / stats.reports, 3)
        if stats.reports else None,
        "client_cpu_s": round(own_cpu, 2),
        "server_core": args.server_core,
        "client_cores": sorted(os.sched_getaffinity(0)),
        "sqlite_synchronous": args.sync,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10, help="measured rounds")
    p.add_argument("--warmup", type=int, default=1, help="rounds before measuring")
    p.add_argument("--steps", type=int, default=16, help="(k, g) scalars per report")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=None,
                   help="core for the clients (default: every core but the server's)")
    p.add_argument("--sync", choices=("full", "normal"), default="full")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--profile", metavar="FILE",
                   help="run the server under cProfile and write its stats to FILE (pstats); "
                   "its figures are then the profiler's, not the server's")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    cores = os.sched_getaffinity(0)
    client_cores = ({args.client_core} if args.client_core is not None
                    else cores - {args.server_core})
    os.sched_setaffinity(0, client_cores or cores)
    raise_fd_limit(4 * args.clients + 256)
    gc.set_threshold(200_000, 20, 100)  # as the server does (zorba_server.cli.tune_gc)
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
