"""The coordinator's round loop: sample, sign, train, validate and aggregate, account, evaluate,
checkpoint.

Runs on any Flower ``Grid`` (simulation or Deployment Engine); ``app.py`` is the ServerApp shell.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from attune.server.aggregation import AggregationConfig
from attune.server.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from attune.server.config import ServerConfig
from attune.server.privacy import UserLevelAccountant
from attune.server.secure_aggregation import SecureAggregation, SecureAggregationConfig
from attune.server.strategy import UpdateFedAvg
from attune.shared.accounting import calibrate_noise
from attune.shared.config import TrainConfig
from attune.shared.model import MODEL_VERSION, Personalization
from attune.shared.records import arrays_to_numpy, state_to_arrays, to_config_record
from attune.shared.signing import load_private_key, sign_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRecord:
    """Metrics of one finished round (evaluation metrics are absent when nobody evaluated)."""

    round: int
    train: dict[str, float]
    evaluate: dict[str, float]


RoundCallback = Callable[[RoundRecord], None]


def participations(config: ServerConfig, num_devices: int) -> int:
    """Rounds a device takes part in when cohorts are spread evenly (what noise is planned for)."""
    per_round = min(config.clients_per_round or num_devices, num_devices)
    return max(1, -(-config.rounds * per_round // num_devices))


def planned_train_config(config: ServerConfig, num_devices: int) -> TrainConfig:
    """The TrainConfig devices get: noise calibrated to ``target_epsilon`` when one is given."""
    train = config.train
    if not train.private or config.target_epsilon is None:
        return train
    sigma = calibrate_noise(
        epsilon=config.target_epsilon, delta=config.delta,
        sample_rate=train.sample_rate, steps=participations(config, num_devices) * train.steps_per_round,
    )
    return replace(train, noise_multiplier=sigma)


def aggregation_config(config: ServerConfig, noise_multiplier: float) -> AggregationConfig:
    return AggregationConfig(rule=config.aggregation, trim_fraction=config.trim_fraction,
                             update_clip=config.train.update_clip, user_noise_multiplier=noise_multiplier,
                             noise_seed=config.noise_seed)


def user_noise_multiplier(config: ServerConfig, num_devices: int) -> float:
    """The aggregate's noise multiplier: as configured, or calibrated to ``user_target_epsilon``
    over ``rounds`` rounds at this cohort size."""
    if config.user_target_epsilon is None:
        return config.user_noise_multiplier
    cohort = min(config.clients_per_round or num_devices, num_devices)
    return calibrate_noise(epsilon=config.user_target_epsilon, delta=config.user_delta,
                           sample_rate=cohort / num_devices, steps=config.rounds)


def run(grid: Grid, config: ServerConfig, on_round: RoundCallback | None = None) -> list[RoundRecord]:
    """Run rounds up to ``config.rounds`` (from the last checkpoint when resuming); checkpoint
    after each one."""
    arrays = initial_arrays(config)
    nodes = _wait_for_nodes(grid, max(config.min_clients, config.clients_per_round))
    train = planned_train_config(config, len(nodes))
    z = user_noise_multiplier(config, len(nodes)) if config.user_level_dp else 0.0
    log.info("devices: %d; noise multiplier sent: %.4f; user-level noise multiplier: %.4f",
             len(nodes), train.noise_multiplier, z)
    fraction = 1.0 if config.clients_per_round == 0 else config.clients_per_round / len(nodes)
    strategy = UpdateFedAvg(
        config.model,
        server_lr=config.server_lr,
        server_optimizer=config.server_optimizer,
        aggregation=aggregation_config(config, z),
        fraction_train=min(fraction, 1.0),
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=min(config.min_clients, config.clients_per_round or len(nodes)),
        min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
        min_available_nodes=config.min_clients,
    )
    accountant = UserLevelAccountant(z, config.user_delta, config.user_target_epsilon) if z > 0 else None
    first = 1
    if config.resume and config.out_dir is not None:
        resumed = latest_checkpoint(config.out_dir / "checkpoints")
        if resumed is not None:
            arrays = state_to_arrays(resumed.state)
            strategy.server.load_state_dict(resumed.optimizer)
            if accountant is not None and resumed.ledger is not None:
                accountant.ledger.load_state_dict(resumed.ledger)
            first = resumed.round + 1
            log.info("resuming after round %d", resumed.round)
    signing_key = load_private_key(config.signing_key) if config.signing_key is not None else None
    secure = None
    if config.secure_aggregation:
        secure = SecureAggregation(SecureAggregationConfig(timeout=config.round_timeout or None))
    history: list[RoundRecord] = []
    for server_round in range(first, config.rounds + 1):
        record = to_config_record(config.model, train)
        if accountant is not None:
            record["user-epsilon"], record["user-delta"] = accountant.epsilon(), config.user_delta
        if signing_key is not None:
            record["model-signature"] = sign_model(signing_key, arrays_to_numpy(arrays), MODEL_VERSION,
                                                   server_round)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(dict(record)), grid))
        population = len(list(grid.get_node_ids()))
        if accountant is not None and not accountant.admits(len(messages), population):
            break
        timeout = config.round_timeout or None  # devices that do not answer in time are left out
        if secure is not None:
            nodes = [msg.metadata.dst_node_id for msg in messages]
            mean, rows, failed = secure.mean_update(grid, server_round, arrays, ConfigRecord(dict(record)),
                                                    nodes)
            new_arrays, train_metrics = strategy.apply_secure_mean(server_round, mean, rows, failed)
            answered = len(rows) + failed
        else:
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            answered = len(replies)
        train_metrics = train_metrics or MetricRecord()
        train_metrics["devices-missing"] = len(messages) - answered
        if accountant is not None:
            accountant.record(len(messages), population)
            train_metrics["user-epsilon"] = accountant.epsilon()
            train_metrics["user-noise-multiplier"] = z
        if new_arrays is not None:
            arrays = new_arrays
        eval_metrics = None
        if config.fraction_evaluate > 0:
            if signing_key is not None:
                record["model-signature"] = sign_model(signing_key, arrays_to_numpy(arrays),
                                                       MODEL_VERSION, server_round)
            eval_replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(record)), grid),
                timeout=timeout,
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
            save_checkpoint(config.out_dir / "checkpoints", Checkpoint(
                server_round, state, strategy.server.state_dict(),
                accountant.ledger.state_dict() if accountant is not None else None))
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
