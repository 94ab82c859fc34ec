"""A Flower ``Grid`` that delivers messages to ClientApp handlers in this process.

Lets tests drive the real coordinator loop (sampling, signing, validation, aggregation,
accounting, checkpoints) in seconds, without Ray or a SuperLink. Nodes in ``offline`` drop
every message, as a device that went away mid-round would.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from attune.client.flower_app import handle_evaluate, handle_train
from attune.client.settings import DeviceSettings


class InProcessGrid(Grid):
    def __init__(self, devices: dict[int, DeviceSettings]) -> None:
        self.devices = devices
        self.offline: set[int] = set()
        self.delivered: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.devices)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            self.delivered.append(msg)
            handler = handle_train if msg.metadata.message_type == "train" else handle_evaluate
            replies.append(handler(msg, self.devices[node]))
        return replies

    def push_messages(self, messages):  # pragma: no cover - send_and_receive is all the loop uses
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError
