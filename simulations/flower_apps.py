"""The Flower App that ``attune simulate --backend flower`` hands to ``flwr run``: the production
coordinator loop and ClientApp, with only what a simulation needs around them.

Flower's simulation runtime gives each virtual SuperNode a ``partition-id``; the device with that
index finds its store under the run's ``out-dir``. The ServerApp runs in Flower's process, not the
simulator's, so at each round the simulator evaluates it saves the global model and the devices'
user vectors (read from their stores, as the in-process backend reads them) for the simulator to
score exactly. Before an evaluation round each device gets its held-out event recorded, as the
person's app would record it, and loses it before its next round (``play_the_app``): the
coordinator's DP estimate is then of the same events the simulator scores.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import tomli_w
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from attune.client.flower_app import make_client_app
from attune.client.personalizer import Personalizer
from attune.client.policy import PrivacyConfig
from attune.client.secure_aggregation import DECLINED
from attune.client.settings import DeviceSettings
from attune.server.app import transport_for
from attune.server.config import ServerConfig, to_run_config
from attune.server.coordinator import RoundRecord, run
from attune.shared.config import RoundTask
from attune.shared.errors import ConfigError, InvalidEventError
from attune.shared.wire import RoundRequest
from attune.simulations.devices import held_out, read_user_vectors, store_path

HARNESS = "flower-simulation.json"
FINISHED = "flower-finished"


@dataclass(frozen=True)
class Harness:
    """What the simulator tells its Flower App beyond the coordinator's run config."""

    devices: int
    privacy: PrivacyConfig  # every simulated device's own limits
    evaluate: tuple[int, ...]  # rounds whose model and user vectors the simulator scores

    def write(self, out: Path) -> None:
        (out / HARNESS).write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, out: Path) -> Harness:
        raw = json.loads((out / HARNESS).read_text())
        return cls(devices=int(raw["devices"]), privacy=PrivacyConfig(**raw["privacy"]),
                   evaluate=tuple(int(r) for r in raw["evaluate"]))


def coordinator_keys(out: Path) -> tuple[Path, Path]:
    """The simulated coordinator's signing key and the public key every device trusts."""
    return out / "keys" / "coordinator.pem", out / "keys" / "coordinator.pub.pem"


def write_app(out: Path, server: ServerConfig, harness: Harness) -> Path:
    """The folder ``flwr run`` builds the app from: a ``pyproject.toml`` naming this module's
    components, with ``server`` as its whole run config (read back exactly)."""
    harness.write(out)
    app = out / "app"
    app.mkdir(parents=True, exist_ok=True)
    project = {
        "project": {"name": "attune-simulation", "version": "1.0.0", "license": "Apache-2.0",
                    "description": "attune simulate --backend flower", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "attune",
            "components": {"serverapp": f"{__name__}:server_app", "clientapp": f"{__name__}:client_app"},
            "config": to_run_config(server)}}},
    }
    (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    return app


def snapshot_path(out: Path, server_round: int) -> Path:
    return out / "evaluation" / f"round-{server_round:06d}.pt"


def _not_a_decline(record: logging.LogRecord) -> bool:
    """Flower's simulation runtime logs a device that declines a secure round (its budget is spent,
    consent withdrawn) as a ClientApp error with a traceback; declining is how a device drops out."""
    message = record.getMessage()
    return DECLINED not in message and "An exception was raised when processing a message" not in message


logging.getLogger("flwr").addFilter(_not_a_decline)  # keeps the run's log to real errors


def play_the_app(out: Path, user: int, device: Personalizer, request: RoundRequest) -> None:
    """What the simulated person's app does before a verified round: delete the held-out event it
    recorded for the last evaluation round, and record it again (with the round's model, which the
    device adopts, as the newest it holds) for this one if it evaluates."""
    marker = out / "held-out-recorded" / f"device-{user:06d}.json"
    if marker.exists():
        try:
            device.forget_event(int(json.loads(marker.read_text())))
        except InvalidEventError:
            pass  # the person erased it already
        marker.unlink()
    if request.config.task is not RoundTask.EVALUATE or not device.consented:
        return
    device.set_global(request.state)
    event = held_out(out, user)
    device.record(event)
    recorded = max(stored.id for stored in device.stored_events() if stored.event == event)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(recorded))


def _device_settings(context: Context) -> DeviceSettings:
    out = Path(str(context.run_config["out-dir"]))
    if "partition-id" not in context.node_config:
        raise ConfigError("this app runs in Flower's simulation runtime, where each node has a partition-id")
    device, seed = int(context.node_config["partition-id"]), int(context.run_config["seed"])
    torch.set_num_threads(1)
    return DeviceSettings(store_path=store_path(out, device), privacy=Harness.read(out).privacy,
                          vocabulary_path=out / "vocabulary.json", simulation_seed=(seed, device),
                          coordinator_public_key=coordinator_keys(out)[1],
                          before_round=partial(play_the_app, out, device))


client_app = make_client_app(_device_settings)
server_app = ServerApp()


@server_app.main()
def _coordinate(grid: Grid, context: Context) -> None:
    config = ServerConfig.parse(context.run_config)
    if config.out_dir is None:
        raise ConfigError("the simulation app needs out-dir")
    out = config.out_dir
    harness = Harness.read(out)

    def save_for_evaluation(record: RoundRecord, state: dict[str, torch.Tensor]) -> None:
        if record.round in harness.evaluate:
            users, started = read_user_vectors(out, harness.devices, config.model.dim)
            path = snapshot_path(out, record.round)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": state, "users": users, "started": started}, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)  # the simulator never reads half a file

    run(transport_for(grid, config), config, save_for_evaluation)
    (out / FINISHED).touch()
