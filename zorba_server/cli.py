"""`zorba-server`: run the aggregation server from a TOML config and flags."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from zorba_common.readout import READOUT_DIRECTIONS_HELP, READOUT_LR_HELP, READOUT_TRUST_RADIUS_HELP
from zorba_common.roles import docs_location, version_text
from zorba_common.run_defaults import ESTIMATORS
from zorba_server import store_tools
from zorba_server.aggregation_rules import RULES, rules_help
from zorba_server.app import create_app
from zorba_server.config import (
    POOL_SLICES,
    AggregationConfig,
    ConfigError,
    RunConfig,
    ServerConfig,
    load_config,
)
from zorba_server.enrolment import new_secret
from zorba_server.http_edge import HeadLimits, app_runner, listen
from zorba_server.modes import MODES
from zorba_server.run_help import PLATEAU_ROUNDS_HELP, POOL_SLICES_HELP, TRUST_RADIUS_HELP
from zorba_server.storage import StoreError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zorba-server",
        description="Aggregation server of zorba-edge (zeroth-order federated fine-tuning). "
        "Flags override the config file; the enrolment secret comes from the file or the "
        "ZORBA_ENROLMENT_SECRET environment variable. Tools: `zorba-server check --db DB` "
        "(check a run database), `zorba-server backup --db DB --out FILE`, `zorba-server secret` "
        "(a fresh enrolment secret).",
        epilog=f"User's guide: {docs_location()} (operating a server: server.md).",
    )
    p.add_argument("--version", action="version", version=version_text("zorba-server"))
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file with [server], [storage], [run], [aggregation] and "
                   "[scheduler] sections (the user's guide, server.md); flags below override it")
    g = p.add_argument_group("listening")
    g.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for a LAN)")
    g.add_argument("--port", type=int, help="TCP port (default 8470; 0: any free port, printed)")
    g.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve HTTPS only")
    g.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    g = p.add_argument_group("storage")
    g.add_argument("--db", metavar="FILE|URL",
                   help="where the run is stored: a SQLite file (default zorba-server.sqlite3) or a "
                   "PostgreSQL database as a postgresql://user@host/dbname URL; an existing one "
                   "resumes its run")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help="run seed of the perturbation directions (default 0)")
    g.add_argument("--pool-size", type=int, help="K, seeds in the pool (default 1024)")
    g.add_argument("--lr", type=float,
                   help=f"learning rate of the ZO steps (default {RunConfig.lr:g}; with "
                   "run.lr_scaling dimension, the step of a client perturbing one average block)")
    g.add_argument("--mu", type=float, help="perturbation scale (default 1e-3)")
    g.add_argument("--estimator", choices=list(ESTIMATORS),
                   help="one-sided (default): a batch's directions share one unperturbed forward; "
                   "antithetic: two forwards per direction")
    g.add_argument("--directions", type=int, help="directions measured on each batch (default 4)")
    g.add_argument("--trust-radius", type=float, metavar="FRACTION",
                   help=f"{TRUST_RADIUS_HELP} (default {RunConfig.trust_radius:g})")
    g.add_argument("--readout-directions", type=int, metavar="N",
                   help=f"{READOUT_DIRECTIONS_HELP} (default {RunConfig.readout_directions})")
    g.add_argument("--readout-lr", type=float,
                   help=f"{READOUT_LR_HELP} (default {RunConfig.readout_lr:g})")
    g.add_argument("--readout-trust-radius", type=float, metavar="FRACTION",
                   help=f"{READOUT_TRUST_RADIUS_HELP} (default {RunConfig.readout_trust_radius:g})")
    g.add_argument("--plateau-rounds", type=int, metavar="N",
                   help=f"{PLATEAU_ROUNDS_HELP} (default {RunConfig.plateau_rounds})")
    g.add_argument("--pool-slices", choices=list(POOL_SLICES),
                   help=f"{POOL_SLICES_HELP} (default {RunConfig.pool_slices})")
    g.add_argument("--batch-size", type=int, help="examples per local step (default 8)")
    g.add_argument("--seq-len", type=int, help="tokens per example (default 64)")
    g.add_argument("--min-clients", type=int,
                   help="active clients (seen within run.member_timeout_s) needed before any "
                   "round opens (default 1)")
    g.add_argument("--min-reports", type=int,
                   help="reports a round needs to be applied; fewer: it is re-run (default 1)")
    g.add_argument("--round-duration", type=float, metavar="SECONDS",
                   help="seconds from a round's opening to its deadline (default 300)")
    g.add_argument("--max-rounds", type=int, help="stop after this many applied rounds (0: never)")
    modes = "; ".join(f"{name}: {mode.summary}" for name, mode in MODES.items())
    g.add_argument("--mode", choices=list(MODES),
                   help=f"zorba or a baseline to compare with: {modes}")
    g = p.add_argument_group("aggregation and scheduling")
    g.add_argument("--aggregation", choices=list(RULES),
                   help=f"how each (k, block) value is aggregated: {rules_help()} "
                   f"(default {AggregationConfig().method})")
    g.add_argument("--clip", type=float, help="clip each projected gradient to [-clip, clip] first")
    g.add_argument("--epsilon", type=float,
                   help="share of the best coverage the memory stage may give up (default 0.05)")
    g.add_argument("--min-cover", type=int, help="clients wanted per block (default 1)")
    p.add_argument("--insecure-secret", action="store_true",
                   help="accept an enrolment secret shorter than 16 characters (a throwaway run "
                   "on a trusted network only; `zorba-server secret` makes a good one)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="default INFO")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return load_config(args.config, {
        "server": {"host": args.host, "port": args.port, "tls_cert": args.tls_cert,
                   "tls_key": args.tls_key},
        "storage": {"path": args.db},
        "run": {"seed": args.seed, "pool_size": args.pool_size, "lr": args.lr, "mu": args.mu,
                "estimator": args.estimator, "directions": args.directions,
                "readout_directions": args.readout_directions, "readout_lr": args.readout_lr,
                "readout_trust_radius": args.readout_trust_radius,
                "trust_radius": args.trust_radius, "plateau_rounds": args.plateau_rounds,
                "pool_slices": args.pool_slices, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "min_clients": args.min_clients, "min_reports": args.min_reports,
                "round_duration_s": args.round_duration, "max_rounds": args.max_rounds,
                "mode": args.mode},
        "aggregation": {"method": args.aggregation, "clip": args.clip},
        "scheduler": {"epsilon": args.epsilon, "min_cover": args.min_cover},
    }, insecure_secret=args.insecure_secret)


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The HTTPS context, or a ConfigError naming the file that is missing or bad."""
    cert, key = config.server.tls_cert, config.server.tls_key
    if cert is None or key is None:
        return None
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"the TLS file {path} ({flag}) does not exist")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} (--tls-cert) with the key "
                          f"{key} (--tls-key): {exc}") from None
    return context


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any run is created or resumed: a busy port is one
    line naming it, and no database was touched."""
    where = f"{host}:{port}"
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
        return socket.create_server(address[:2], family=family)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {where}: the host does not resolve ({exc.strerror}); "
                          "check --host") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"cannot listen on {where}: the port is in use (another server?); "
                              "stop it or pick another --port") from None
        raise ConfigError(f"cannot listen on {where}: {exc.strerror}; check --host and --port"
                          ) from None


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running server.

    The server holds a large, long-lived heap (members, plans, connections) and allocates
    a lot per request; with the default thresholds, full collections re-scan that heap
    every few hundred requests. Measured with benchmarks/server_load.py (1,000 clients):
    collections took about half of the server's CPU time before, a tenth after.

    A young generation of 200,000 objects: what a round keeps alive until it closes (each
    client's pending long-poll and booked report, about 70 objects a client) passed 50,000
    at 1,000 clients, so every round ran a collection over all of it (34 ms; 0.03 ms of CPU
    per report, 7%). Objects without cycles are freed when their last reference goes, so
    what waits for a collection is only cyclic garbage, at most that many objects.
    """
    gc.collect()
    gc.freeze()  # what start-up loaded is never scanned again
    gc.set_threshold(200_000, 20, 100)


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then finish the queued commits and stop."""
    # Everything that can fail without a database first: the TLS files, then the port. Only
    # then does the app take the run's lock and create or resume the run (runner.setup).
    context = ssl_context(config)
    sock = bind(config.server.host, config.server.port)
    runner = app_runner(create_app(config))
    try:
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    tune_gc()
    listening = await listen(runner, sock, context, HeadLimits(
        config.server.header_timeout_s, config.server.max_pending_heads))
    scheme = "https" if context else "http"
    host, port, *_ = sock.getsockname()
    print(f"zorba-server listening on {scheme}://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listening.close()
        await runner.cleanup()


TOOLS = ("check", "backup", "secret")
"""`zorba-server TOOL ...`: commands that do one job and exit, without serving."""


def tool_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zorba-server", description="Tools of the aggregation "
                                "server; run `zorba-server --help` for the server itself.")
    sub = p.add_subparsers(dest="tool", required=True)
    c = sub.add_parser("check", help="check a run database as the server does on open (and "
                       "SQLite's page checks); writes nothing")
    c.add_argument("--db", required=True, metavar="FILE|URL")
    b = sub.add_parser("backup", help="a consistent copy of a SQLite run database, even while a "
                       "server runs on it (PostgreSQL: pg_dump)")
    b.add_argument("--db", required=True, metavar="FILE|URL")
    b.add_argument("--out", required=True, metavar="FILE", help="a new file")
    sub.add_parser("secret", help="print a fresh random enrolment secret")
    return p.parse_args(argv)


def run_tool(argv: Sequence[str]) -> int:
    args = tool_args(argv)
    try:
        if args.tool == "check":
            print(store_tools.check(args.db))
        elif args.tool == "backup":
            print(store_tools.backup(args.db, Path(args.out)))
        else:
            print(new_secret())
    except StoreError as exc:
        print(f"zorba-server {args.tool}: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return run_tool(argv)
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
        asyncio.run(serve(config))
    except (ConfigError, StoreError) as exc:
        print(f"zorba-server: {exc}", file=sys.stderr)
        return 2
    return 0
