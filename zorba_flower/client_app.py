"""The Flower ClientApp: QUERY answers the node's device profile, TRAIN runs one round of the
local trainer and answers its report. Flower loads `app` from `[tool.flwr.app.components]`.

The work runs in this process (`NodeWorker`), or, where the node config names a
`worker-socket`, in the node's long-lived worker (`WorkerLink`, the same `NodeWorker` in
another process that keeps the model loaded)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from zorba_common.messages import DeviceProfile
from zorba_flower import codec
from zorba_flower.settings import ClientAppSettings, client_app_settings
from zorba_flower.worker_link import WorkerLink

if TYPE_CHECKING:
    from zorba_flower.client_worker import NodeWorker


class Node(Protocol):
    """What handles a node's messages: `NodeWorker` here, or `WorkerLink` to the node's worker."""

    def profile(self, s: ClientAppSettings, query: codec.ProfileQuery) -> DeviceProfile: ...

    def train(self, s: ClientAppSettings, instruction: codec.TrainInstruction,
              batches_drawn: int) -> codec.TrainOutcome: ...


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is Flower's with `overrides` on top (in-process runs,
    where there is no app pyproject to read it from)."""
    app = ClientApp()
    # One worker per process: what a Simulation Engine actor keeps between messages. Made
    # on first use: a process that forwards to the node's worker never imports torch.
    in_process: list[NodeWorker] = []

    def settings(context: Context) -> ClientAppSettings:
        return client_app_settings({**context.run_config, **(overrides or {})}, context.node_config)

    def node(s: ClientAppSettings) -> Node:
        if s.worker_socket:
            return WorkerLink(Path(s.worker_socket))
        if not in_process:
            from zorba_flower.client_worker import NodeWorker

            in_process.append(NodeWorker())
        return in_process[0]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        s = settings(context)
        profile = node(s).profile(s, codec.read_profile_query(msg.content))
        return Message(codec.profile_reply(profile, s.partition_id), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        s = settings(context)
        outcome = node(s).train(s, codec.read_train_instruction(msg.content), batches_drawn(context))
        # The node's state outlives the process that served this message (Flower keeps it
        # per node and run), so the next round's batches follow on from this round's.
        context.state[NODE_STATE] = ConfigRecord({BATCHES_DRAWN: outcome.batches_drawn})
        if isinstance(outcome.answer, codec.Decline):
            return Message(codec.decline_reply(outcome.answer.reason), reply_to=msg)
        return Message(codec.report_reply(outcome.answer, outcome.timing), reply_to=msg)

    return app


NODE_STATE, BATCHES_DRAWN = "zorba-node", "batches-drawn"


def batches_drawn(context: Context) -> int:
    """How far this node's batch stream has come in this run (0 before its first round)."""
    record = context.state.config_records.get(NODE_STATE)
    return int(record[BATCHES_DRAWN]) if record is not None else 0  # type: ignore[arg-type]


app = make_client_app()
