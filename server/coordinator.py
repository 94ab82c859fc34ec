"""The coordinator's round loop: sample, train, validate and aggregate, evaluate, checkpoint.

Runs on any Flower ``Grid`` (simulation or Deployment Engine); ``app.py`` is the ServerApp shell.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from attune.server.checkpoint import save_checkpoint
from attune.server.config import ServerConfig
from attune.server.strategy import UpdateFedAvg
from attune.shared.accounting import calibrate_noise
from attune.shared.config import TrainConfig
from attune.shared.model import Personalization
from attune.shared.records import arrays_to_numpy, state_to_arrays, to_config_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRecord:
    """Metrics of one finished round (evaluation metrics are absent when nobody evaluated)."""

    round: int
    train: dict[str, float]
    evaluate: dict[str, float]


RoundCallback = Callable[[RoundRecord], None]


def planned_train_config(config: ServerConfig, num_devices: int) -> TrainConfig:
    """The TrainConfig devices get: noise calibrated to ``target_epsilon`` when one is given."""
    train = config.train
    if not train.private or config.target_epsilon is None:
        return train
    per_round = config.clients_per_round or num_devices
    participations = max(1, -(-config.rounds * min(per_round, num_devices) // num_devices))
    sigma = calibrate_noise(
        epsilon=config.target_epsilon, delta=config.delta,
        sample_rate=train.sample_rate, steps=participations * train.steps_per_round,
    )
    return replace(train, noise_multiplier=sigma)


def run(grid: Grid, config: ServerConfig, on_round: RoundCallback | None = None) -> list[RoundRecord]:
    """Run ``config.rounds`` rounds; checkpoint the global model after each one."""
    arrays = initial_arrays(config)
    nodes = _wait_for_nodes(grid, max(config.min_clients, config.clients_per_round))
    train = planned_train_config(config, len(nodes))
    log.info("devices: %d; noise multiplier sent: %.4f", len(nodes), train.noise_multiplier)
    fraction = 1.0 if config.clients_per_round == 0 else config.clients_per_round / len(nodes)
    strategy = UpdateFedAvg(
        config.model,
        server_lr=config.server_lr,
        server_optimizer=config.server_optimizer,
        fraction_train=min(fraction, 1.0),
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=min(config.min_clients, len(nodes)),
        min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
        min_available_nodes=config.min_clients,
    )
    record = to_config_record(config.model, train)
    history: list[RoundRecord] = []
    for server_round in range(1, config.rounds + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(dict(record)), grid)
        )
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        eval_metrics = None
        if config.fraction_evaluate > 0:
            eval_replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(record)), grid)
            )
            eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
        done = RoundRecord(
            round=server_round,
            train={k: float(v) for k, v in (train_metrics or {}).items()},  # type: ignore[arg-type]
            evaluate={k: float(v) for k, v in (eval_metrics or {}).items()},  # type: ignore[arg-type]
        )
        history.append(done)
        if config.out_dir is not None:
            state = {k: torch.from_numpy(v) for k, v in arrays_to_numpy(arrays).items()}
            save_checkpoint(config.out_dir / "checkpoints", server_round, state)
            with (config.out_dir / "rounds.jsonl").open("a") as handle:
                handle.write(json.dumps(asdict(done)) + "\n")
        if on_round is not None:
            on_round(done)
    return history


def _wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    while len(nodes := list(grid.get_node_ids())) < minimum:
        log.info("waiting for devices: %d connected, %d needed", len(nodes), minimum)
        time.sleep(1)
    return nodes


def initial_arrays(config: ServerConfig) -> ArrayRecord:
    generator = torch.Generator().manual_seed(config.seed)
    return state_to_arrays(Personalization(config.model, generator=generator).global_state())
