"""A Flower ``Grid`` that delivers messages to the real Attune ClientApp in this process.

Lets tests drive the real coordinator loop (sampling, signing, validation, secure aggregation,
accounting, checkpoints) in seconds, without Ray or a SuperLink. Each node keeps its own
``Context`` across messages, as a SuperNode does. Nodes in ``offline`` drop every message; a node
in ``drop_after`` goes silent after that many messages (a device that leaves mid-round).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from attune.client.flower_app import make_client_app
from attune.client.policy import PrivacyConfig
from attune.client.settings import DeviceSettings


def flower_reason(error: Exception) -> str:
    """What a SuperNode sends the coordinator for a ClientApp exception (flwr 1.42,
    ``supernode/runtime/run_clientapp.py``): its class and its text."""
    return str(type(error)) + ":<'" + str(error) + "'>"


class InProcessGrid(Grid):
    def __init__(self, devices: dict[int, DeviceSettings]) -> None:
        self.devices = devices
        self.offline: set[int] = set()
        self.drop_after: dict[int, int] = {}
        self.delivered: list[Message] = []
        self._counts = dict.fromkeys(devices, 0)
        self._contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                                        run_config={}) for node in devices}
        self.app = make_client_app(lambda context: self.devices[context.node_id])

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
            if node in self.offline or self._counts[node] >= self.drop_after.get(node, 10**9):
                continue
            self._counts[node] += 1
            self.delivered.append(msg)
            received = copy.deepcopy(msg)  # as if serialized: nodes never share one content object
            try:
                reply = self.app(received, self._contexts[node])
            except Exception as error:  # noqa: BLE001 - a SuperNode turns an app's exception into an error reply
                reply = Message(error=Error(code=0, reason=flower_reason(error)), reply_to=received)
            replies.append(reply)
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


def simulated_devices(directory: Path, users: int = 6, seed: int = 0, events: int = 40, items: int = 300):
    """A small synthetic log written as one store per user (``attune.simulations.devices``), a
    signing key pair, and the log and split themselves."""
    from attune.shared.signing import generate_keypair
    from attune.simulations.datasets import synthetic
    from attune.simulations.devices import write_devices
    from attune.simulations.evaluation import leave_one_out

    log = synthetic(num_users=users, events_per_user=events, num_items=items, seed=seed)
    split = leave_one_out(log, seed=seed)
    vocabulary = write_devices(log, split, directory)
    generate_keypair(directory / "coordinator.pem", directory / "coordinator.pub.pem")
    return log, split, vocabulary


def device_grid(directory: Path, users: int, vocabulary: Path, seed: int = 0,
                privacy: PrivacyConfig | None = None) -> InProcessGrid:
    """The real ClientApp for every store in ``directory``, seeded as the simulations seed them."""
    from attune.simulations.devices import store_path

    return InProcessGrid({user: DeviceSettings(
        store_path=store_path(directory, user), privacy=privacy or PrivacyConfig(), vocabulary_path=vocabulary,
        simulation_seed=(seed, user), coordinator_public_key=directory / "coordinator.pub.pem")
        for user in range(users)})
