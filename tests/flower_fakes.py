"""A fake Flower Grid for in-process tests of the server app (not a test module)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message], "RecordDict | Error | None"]


class Crash(Exception):
    """The SuperLink went away mid-round."""


@dataclass
class FakeGrid:
    """Delivers each message to its node's handler through Flower's protobuf serialisation;
    a handler's None is a node that never answers."""

    nodes: dict[int, Handler]
    sent: list[Message] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)
    crash_on_round: int | None = None
    lost: set[int] = field(default_factory=set)
    """Nodes the SuperLink lost: it answers for them with an error from itself (node 1)."""

    def __post_init__(self) -> None:
        # The identity Flower gives a process that runs a ServerApp, which the Message
        # constructor reads (the values flwr.simulation.run_simulation sets for run 1).
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        meta = Metadata(1, f"m{len(self.sent)}", 0, dst_node_id, "", group_id, 0.0, ttl or 0.0,
                        message_type)
        return Message(metadata=meta, content=content)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            if not msg.metadata.message_id:  # the SuperLink names each message it accepts
                msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(msg)
            self.timeouts.append(timeout)
            if self.crash_on_round is not None and msg.metadata.group_id == str(self.crash_on_round):
                raise Crash()
            delivered = Message(metadata=msg.metadata,
                                content=recorddict_from_proto(recorddict_to_proto(msg.content)))
            lost = msg.metadata.dst_node_id in self.lost
            answer = (Error(code=3, reason="node unavailable") if lost
                      else self.nodes[msg.metadata.dst_node_id](delivered))
            if answer is None:
                continue
            src = 1 if lost else msg.metadata.dst_node_id
            meta = Metadata(1, "r", src, 0, msg.metadata.message_id,
                            msg.metadata.group_id, 0.0, msg.metadata.ttl, msg.metadata.message_type)
            if isinstance(answer, Error):
                replies.append(Message(metadata=meta, error=answer))
            else:
                replies.append(Message(metadata=meta, content=answer))
        return replies


def node_handler(app: ClientApp, node_id: int, node_config: dict[str, Any],
                 state: RecordDict | None = None) -> Handler:
    """Node `node_id` running `app` in this process. Its Flower state (`state`, or a new one)
    lives as long as the node, as a SuperNode (or the Simulation Engine) keeps it between
    messages."""
    state = RecordDict() if state is None else state

    def handle(msg: Message) -> RecordDict:
        context = Context(run_id=1, node_id=node_id, node_config=node_config, state=state,
                          run_config={})
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        return reply.content

    return handle
