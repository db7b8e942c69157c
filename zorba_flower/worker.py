"""A node's long-lived worker for Flower's Deployment Engine: the model stays loaded.

    python -m zorba_flower.worker --socket /run/zorba/node.sock

Start it once on the SuperNode's machine and give the node `--node-config
'... worker-socket="/run/zorba/node.sock"'`. Each message's fresh ClientApp process then
forwards the message here (zorba_flower/worker_link.py has the wire) and returns this
process's answer. The work is the in-process path's own `NodeWorker`, so a round through
the worker and a round in the ClientApp give the same report and the same alpha. The
node's batch-stream position still lives in the node's Flower state: every TRAIN request
carries it and the worker seeks to it, whatever it served before.

Requests are served one at a time (a node has one message in flight; `NodeWorker` is not
shared across threads). The socket is made readable and writable by this user only.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import socketserver
import sys
import time
from pathlib import Path
from typing import Any

from zorba_common.codec import decode, encode
from zorba_common.limits import MAX_REGISTER_BYTES, MAX_RESPONSE_BYTES
from zorba_flower.client_worker import NodeWorker
from zorba_flower.codec import Decline, ProfileQuery, TrainInstruction
from zorba_flower.worker_link import recv_frame, send_frame, settings_from_wire

log = logging.getLogger("zorba_flower.worker")


def handle(worker: NodeWorker, request: dict[str, Any]) -> dict[str, Any]:
    """One request's reply map (zorba_flower/worker_link.py); errors become {"error": ...}."""
    op = request.get("op")
    try:
        settings = settings_from_wire(request.get("settings"))
        body = request.get("body")
        if not isinstance(body, bytes):
            raise ValueError("the request has no message body")
        if op == "profile":
            query = decode(ProfileQuery, body, max_bytes=MAX_REGISTER_BYTES)
            return {"kind": "profile", "body": encode(worker.profile(settings, query))}
        if op == "train":
            instruction = decode(TrainInstruction, body, max_bytes=MAX_RESPONSE_BYTES)
            drawn = request.get("batches_drawn")
            if not isinstance(drawn, int) or drawn < 0:
                raise ValueError(f"batches_drawn must be a count >= 0, not {drawn!r}")
            outcome = worker.train(settings, instruction, drawn)
            kind = "decline" if isinstance(outcome.answer, Decline) else "report"
            t = outcome.timing
            return {"kind": kind, "body": encode(outcome.answer),
                    "timing": [t.handler_s, t.train_s, t.rss_peak_bytes],
                    "batches_drawn": outcome.batches_drawn}
        raise ValueError(f"unknown op {op!r}: expected 'profile' or 'train'")
    except Exception as exc:  # noqa: BLE001 (the ClientApp raises it; this worker goes on serving)
        log.exception("%s request failed", op)
        return {"error": f"{type(exc).__name__}: {exc}"}


class WorkerServer(socketserver.UnixStreamServer):
    """Serves `worker` on a Unix socket at `path`, one connection (one request) at a time."""

    def __init__(self, path: Path, worker: NodeWorker | None = None) -> None:
        self.path = path
        self.worker = worker or NodeWorker()
        claim_socket_path(path)
        old_umask = os.umask(0o177)  # the socket file is born rw for this user only
        try:
            super().__init__(str(path), _Connection)
        finally:
            os.umask(old_umask)

    def server_close(self) -> None:
        super().server_close()
        self.path.unlink(missing_ok=True)


class _Connection(socketserver.BaseRequestHandler):
    server: WorkerServer

    def handle(self) -> None:
        started = time.perf_counter()
        try:
            request = recv_frame(self.request)
        except (OSError, ValueError) as exc:
            log.warning("dropped a connection: %s", exc)
            return
        reply = handle(self.server.worker, request)
        log.info("%s: %s in %.2f s", request.get("op"), reply.get("kind", "error"),
                 time.perf_counter() - started)
        try:
            send_frame(self.request, reply)
        except OSError as exc:  # the ClientApp gave up (Flower's TTL): nothing to answer
            log.warning("could not send the %s reply: %s", request.get("op"), exc)


def claim_socket_path(path: Path) -> None:
    """Remove a stale socket file left by a worker that died; refuse a live one."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise SystemExit(f"a worker already listens at {path}: stop it first, or choose another --socket")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zorba_flower.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True,
                        help="the Unix socket to listen on (the node config's worker-socket)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the socket file is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with WorkerServer(args.socket.expanduser()) as server:
        log.info("serving at %s (pid %d)", server.path, os.getpid())
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
