"""The ClientApp's side of a node's long-lived worker: one request over a Unix socket.

A Deployment Engine node starts a fresh ClientApp process for every message. With
`worker-socket=PATH` in the node config, that process imports neither torch nor the model:
it hands the message to the worker that listens at PATH (`python -m zorba_flower.worker
--socket PATH`, started once on the node), which keeps the model loaded between rounds and
runs the same `NodeWorker` the in-process path runs.

Wire: one connection per request; each way one frame, a 4-byte big-endian length and a
msgpack map. The zorba message inside travels as the same msgpack body the Flower record
carries (`zorba_common.codec.encode`) and is decoded by the same strict decoder.

    request  {"op": "train"|"profile", "settings": {...}, "body": bytes, "batches_drawn": int}
    reply    {"kind": "report"|"decline"|"profile", "body": bytes,
              "timing": [handler_s, train_s, rss_peak_bytes], "batches_drawn": int}
             or {"error": str}
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from zorba_common.codec import SchemaError, decode, encode
from zorba_common.limits import MAX_REGISTER_BYTES, MAX_REPORT_BYTES, MAX_RESPONSE_BYTES
from zorba_common.messages import DeviceProfile, Report
from zorba_flower.codec import Decline, ProfileQuery, Timing, TrainInstruction, TrainOutcome
from zorba_flower.settings import WORKER_SOCKET, ClientAppSettings

MAX_FRAME_BYTES = MAX_RESPONSE_BYTES + 2**20
"""A frame holds at most one TRAIN message's body and the settings."""
PROFILE_TIMEOUT_S = 900.0
"""A worker's first QUERY opens the model and may time a step: minutes on a slow device."""
REPLY_SLACK_S = 120.0
"""Beyond a round's deadline: a worker's first round also loads the model."""
_LENGTH = struct.Struct(">I")


class WorkerError(RuntimeError):
    """The node's worker could not be reached, or answered an error."""


def start_command(path: Path | str) -> str:
    return f"python -m zorba_flower.worker --socket {path}"


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    sock.sendall(_LENGTH.pack(len(body)) + body)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """One frame's map; ConnectionError when the peer closed the connection first."""
    (length,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise SchemaError(f"a worker frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte "
                          "limit: is the peer a zorba Flower worker of the same version?")
    try:
        message = msgpack.unpackb(_recv_exactly(sock, length), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise SchemaError(f"a worker frame is not msgpack ({exc})") from None
    if not isinstance(message, dict):
        raise SchemaError(f"a worker frame must be a map, not {type(message).__name__}")
    return message


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed before a whole frame arrived")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def settings_to_wire(s: ClientAppSettings) -> dict[str, Any]:
    return dataclasses.asdict(s)


def settings_from_wire(values: Any) -> ClientAppSettings:
    try:
        return ClientAppSettings(**values)
    except TypeError as exc:  # not a map, or a field missing or unknown
        raise SchemaError(f"the request's settings do not fit this worker's ClientAppSettings "
                          f"({exc}): run the same zorba-edge version in the ClientApp and the "
                          "worker") from None


@dataclass(frozen=True)
class WorkerLink:
    """The node's worker at `path`, with the interface of the in-process `NodeWorker`."""

    path: Path

    def profile(self, s: ClientAppSettings, query: ProfileQuery) -> DeviceProfile:
        reply = self._ask({"op": "profile", "settings": settings_to_wire(s), "body": encode(query),
                           "batches_drawn": 0}, PROFILE_TIMEOUT_S)
        return decode(DeviceProfile, self._body(reply, "profile"), max_bytes=MAX_REGISTER_BYTES)

    def train(self, s: ClientAppSettings, instruction: TrainInstruction,
              batches_drawn: int) -> TrainOutcome:
        started = time.perf_counter()
        reply = self._ask({"op": "train", "settings": settings_to_wire(s),
                           "body": encode(instruction), "batches_drawn": batches_drawn},
                          instruction.assignment.deadline_in_s + REPLY_SLACK_S)
        answer: Report | Decline
        if reply.get("kind") == "decline":
            answer = decode(Decline, self._body(reply, "decline"), max_bytes=MAX_REGISTER_BYTES)
        else:
            answer = decode(Report, self._body(reply, "report"), max_bytes=MAX_REPORT_BYTES)
        try:
            _, train_s, rss = reply["timing"]
            timing = Timing(time.perf_counter() - started, float(train_s), int(rss))
            return TrainOutcome(answer, timing, int(reply["batches_drawn"]))
        except (KeyError, TypeError, ValueError):
            raise SchemaError(f"the worker at {self.path} sent a train reply without timing and "
                              "batch count: run the same zorba-edge version in both") from None

    def _body(self, reply: dict[str, Any], kind: str) -> bytes:
        body = reply.get("body")
        if reply.get("kind") != kind or not isinstance(body, bytes):
            raise SchemaError(f"the worker at {self.path} answered {reply.get('kind')!r}, expected "
                              f"{kind!r}: run the same zorba-edge version in both")
        return body

    def _ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                raise WorkerError(
                    f"no zorba Flower worker answers at {self.path} ({exc.strerror or exc}): start "
                    f"it on this node with `{start_command(self.path)}`, or remove "
                    f"{WORKER_SOCKET} from the node config to train in the ClientApp process"
                ) from None
            try:
                send_frame(sock, request)
                reply = recv_frame(sock)
            except (OSError, ConnectionError) as exc:  # socket.timeout is an OSError
                raise WorkerError(
                    f"the zorba Flower worker at {self.path} did not answer a {request['op']} "
                    f"request ({exc}): see its log; restart it with `{start_command(self.path)}`"
                ) from None
        if "error" in reply:
            raise WorkerError(f"the zorba Flower worker at {self.path} failed the {request['op']} "
                              f"request: {reply['error']}")
        return reply
