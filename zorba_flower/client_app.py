"""The Flower ClientApp: QUERY answers the node's device profile, TRAIN runs one round of the
local trainer and answers its report. Flower loads `app` from `[tool.flwr.app.components]`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from zorba_flower import codec
from zorba_flower.client_worker import NodeWorker
from zorba_flower.settings import client_app_settings


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is Flower's with `overrides` on top (in-process runs,
    where there is no app pyproject to read it from)."""
    app = ClientApp()
    # One worker per process: what a Simulation Engine actor keeps between messages.
    worker = NodeWorker()

    def settings(context: Context) -> Any:
        return client_app_settings({**context.run_config, **(overrides or {})}, context.node_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        profile = worker.profile(settings(context), codec.read_profile_query(msg.content))
        return Message(codec.profile_reply(profile), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        outcome = worker.train(settings(context), codec.read_train_instruction(msg.content),
                               batches_drawn(context))
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
