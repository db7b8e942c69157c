"""`zorba-server`: run the aggregation server from a TOML config and flags."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Sequence

from aiohttp import web

from zorba_common.roles import docs_location, version_text
from zorba_common.run_defaults import ESTIMATORS
from zorba_server.aggregation_rules import RULES, rules_help
from zorba_server.app import create_app
from zorba_server.config import (
    PLATEAU_ROUNDS_HELP,
    POOL_SLICES,
    POOL_SLICES_HELP,
    TRUST_RADIUS_HELP,
    AggregationConfig,
    ConfigError,
    RunConfig,
    ServerConfig,
    load_config,
)
from zorba_server.modes import MODES
from zorba_server.storage import StoreError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zorba-server",
        description="Aggregation server of zorba-edge (zeroth-order federated fine-tuning). "
        "Flags override the config file; the enrolment secret comes from the file or the "
        "ZORBA_ENROLMENT_SECRET environment variable.",
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
                "trust_radius": args.trust_radius, "plateau_rounds": args.plateau_rounds,
                "pool_slices": args.pool_slices, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "min_clients": args.min_clients, "min_reports": args.min_reports,
                "round_duration_s": args.round_duration, "max_rounds": args.max_rounds,
                "mode": args.mode},
        "aggregation": {"method": args.aggregation, "clip": args.clip},
        "scheduler": {"epsilon": args.epsilon, "min_cover": args.min_cover},
    })


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.server.tls_cert is None or config.server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate/key: {exc}") from None
    return context


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running server.

    The server holds a large, long-lived heap (members, plans, connections) and allocates
    a lot per request; with the default thresholds, full collections re-scan that heap
    every few hundred requests. Measured with benchmarks/server_load.py (1,000 clients):
    collections took about half of the server's CPU time before, a tenth after.
    """
    gc.collect()
    gc.freeze()  # what start-up loaded is never scanned again
    gc.set_threshold(50_000, 20, 100)


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT/SIGTERM, then finish the queued commits and stop."""
    runner = web.AppRunner(create_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    tune_gc()
    context = ssl_context(config)
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=context)
    await site.start()
    scheme = "https" if context else "http"
    for host, port, *_ in runner.addresses:
        print(f"zorba-server listening on {scheme}://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
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
