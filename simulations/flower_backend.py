"""The Flower backend of ``attune simulate``: the real ServerApp and ClientApp in Flower's
simulation engine, one SuperNode and one on-device store per user, every round signed, and in
``distributed`` mode every round through hardened SecAgg+.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from attune.client.policy import PrivacyConfig
from attune.client.secure_aggregation import DECLINED
from attune.client.settings import DeviceSettings
from attune.client.training import Cohort
from attune.server.config import ServerConfig
from attune.server.coordinator import RoundRecord
from attune.shared.accounting import Entry, epsilon_of
from attune.shared.signing import generate_keypair
from attune.simulations.datasets import EventLog
from attune.simulations.devices import read_ledgers, read_user_vectors, store_path, write_devices
from attune.simulations.evaluation import Split
from attune.simulations.fast import Devices


def _not_a_decline(record: logging.LogRecord) -> bool:
    """Flower's simulation engine logs a device that declines a secure round (its budget is spent,
    consent withdrawn) as a ClientApp error with a traceback; declining is how a device drops out."""
    message = record.getMessage()
    return DECLINED not in message and "An exception was raised when processing a message" not in message


Evaluate = Callable[[RoundRecord, dict[str, torch.Tensor], Callable[[], Devices]], None]


def run_flower(log: EventLog, split: Split, server: ServerConfig, privacy: PrivacyConfig, cohort: Cohort,
               evaluate: Evaluate) -> tuple[list[Entry], list[Entry]]:
    """Run the federation; returns the ledger (and local ledger) of the device that spent most."""
    from flwr.simulation import run_simulation

    from attune.client.flower_app import make_client_app
    from attune.server.app import make_server_app
    from attune.simulations.runner import quiet_third_parties

    assert server.out_dir is not None
    out = server.out_dir
    vocabulary = write_devices(log, split, out)
    signing_key, public_key = out / "keys" / "coordinator.pem", out / "keys" / "coordinator.pub.pem"
    generate_keypair(signing_key, public_key)  # every round the devices join is signed
    server = replace(server, signing_key=signing_key)

    def resolve(context) -> DeviceSettings:  # noqa: ANN001 - runs inside the engine's workers
        torch.set_num_threads(1)
        user = int(context.node_config["partition-id"])
        return DeviceSettings(store_path=store_path(out, user), privacy=privacy, vocabulary_path=vocabulary,
                              simulation_seed=(server.seed, user), coordinator_public_key=public_key)

    def devices_now() -> Devices:
        users, started = read_user_vectors(out, log.num_users, server.model.dim)
        return Devices(users=users, started=started, joined=torch.zeros(0, dtype=torch.long))

    quiet_third_parties()
    logging.getLogger("flwr").addFilter(_not_a_decline)
    run_simulation(
        server_app=make_server_app(server, lambda record, state: evaluate(record, state, devices_now)),
        client_app=make_client_app(resolve),
        num_supernodes=log.num_users,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"log_to_driver": False, "include_dashboard": False}},
    )
    ledgers = read_ledgers(out, log.num_users)
    spent = [epsilon_of([e for row in rows for e in row.entries], server.delta) for rows in ledgers]
    top = max(range(len(ledgers)), key=lambda k: spent[k]) if ledgers else 0
    rows = ledgers[top] if ledgers else []
    return [e for row in rows for e in row.entries], [e for row in rows for e in row.local_entries]
