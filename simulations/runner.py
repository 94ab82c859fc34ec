"""``attune simulate``: the real ServerApp and ClientApp in Flower's simulation engine.

One virtual device per user, each with its own on-device store. Writes ``results.json`` and
``curve.png`` to the output folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from attune.client.personalizer import PrivacyConfig
from attune.client.settings import DeviceSettings
from attune.server.config import ServerConfig
from attune.server.coordinator import RoundRecord
from attune.shared.accounting import ACCOUNTANT_NAME
from attune.shared.config import TrainConfig
from attune.shared.errors import ConfigError, DataError
from attune.shared.model import ModelConfig
from attune.shared.seeding import device_seed
from attune.shared.selection import choices
from attune.shared.signing import generate_keypair
from attune.simulations.algorithms import SegmentConfig, algorithm, choice_epsilon, train_config
from attune.simulations.datasets import EventLog, load_csv, load_movielens, synthetic
from attune.simulations.devices import store_path, write_devices
from attune.simulations.evaluation import Split, leave_one_out, popularity_baseline, skew_data_sizes


@dataclass(frozen=True)
class DataSource:
    """Which behavior log to simulate."""

    dataset: str = "synthetic"
    path: Path | None = None
    user_col: str = "user"
    item_col: str = "item"
    time_col: str = "timestamp"
    weight_col: str | None = None
    synthetic_users: int = 200

    def __post_init__(self) -> None:
        if self.dataset not in ("synthetic", "movielens", "csv"):
            raise DataError(f"unknown dataset {self.dataset!r}: use synthetic, movielens or csv")

    def load(self, seed: int) -> EventLog:
        if self.dataset == "synthetic":
            return synthetic(num_users=self.synthetic_users, seed=seed)
        if self.path is None:
            raise DataError(f"--data is required with --dataset {self.dataset}")
        if self.dataset == "movielens":
            return load_movielens(self.path)
        return load_csv(self.path, user_col=self.user_col, item_col=self.item_col,
                        time_col=self.time_col, weight_col=self.weight_col)


@dataclass(frozen=True)
class SimulationConfig:
    """Everything one simulation needs; the CLI builds it, nothing reads flags deeper down."""

    source: DataSource
    server: ServerConfig
    out: Path
    min_events: int = 5
    backend: str = "flower"
    availability: float = 1.0  # share of sampled devices online in a round (fast backend)
    algorithm: str = "partial-local"  # see attune.simulations.algorithms (others: fast backend)
    evaluate_every_round: bool = True  # False: only the final round (fast backend; sweeps)
    data_skew: float = 0.0  # 0: every device keeps all its events; see skew_data_sizes
    segments: SegmentConfig = field(default_factory=SegmentConfig)  # IFCA only

    def __post_init__(self) -> None:
        if self.backend not in ("flower", "fast"):
            raise ConfigError(f"unknown backend {self.backend!r}: use flower or fast")
        if not 0 < self.availability <= 1:
            raise ConfigError(f"availability must be in (0, 1], got {self.availability}")
        if self.availability < 1 and self.backend != "fast":
            raise ConfigError("--availability is simulated by the fast backend only")
        if self.algorithm != "partial-local" and self.backend != "fast":
            raise ConfigError(f"--algorithm {self.algorithm} is simulated by the fast backend only; "
                              "devices and the Flower backend run partial-local")
        if self.data_skew < 0:
            raise ConfigError(f"data skew must be >= 0, got {self.data_skew}")


def _settings_resolver(directory: Path, vocabulary: Path, privacy: PrivacyConfig, seed: int,
                       public_key: Path):
    def resolve(context) -> DeviceSettings:  # runs inside the simulation's worker processes
        import torch

        torch.set_num_threads(1)
        user = int(context.node_config["partition-id"])
        return DeviceSettings(store_path=store_path(directory, user), privacy=privacy,
                              vocabulary_path=vocabulary, seed=device_seed(seed, user),
                              coordinator_public_key=public_key)

    return resolve


def simulate(
    config: SimulationConfig,
    on_round: Callable[[RoundRecord], None] | None = None,
    log: EventLog | None = None,
) -> dict:
    """Run the simulation and return (and write) the results document."""
    server = config.server
    log = log if log is not None else config.source.load(server.seed)
    split = skew_data_sizes(log, leave_one_out(log, seed=server.seed), config.data_skew, server.seed)
    model = replace(server.model, num_items=log.num_items)
    out = config.out
    if (out / "rounds.jsonl").exists():
        (out / "rounds.jsonl").unlink()
    server = replace(server, model=model, out_dir=out, min_clients=log.num_users)
    train = train_config(algorithm(config.algorithm), server, log.num_users, config.segments)
    history: list[RoundRecord] = []

    def record(done: RoundRecord) -> None:
        history.append(done)
        if on_round is not None:
            on_round(done)

    if config.backend == "fast":
        from attune.simulations.fast import simulate_fast

        budget = server.target_epsilon if train.private else None
        report = simulate_fast(log, split, server, config.min_events, budget, on_round=record,
                               availability=config.availability, algorithm_name=config.algorithm,
                               evaluate_every_round=config.evaluate_every_round,
                               segments=config.segments)
    else:
        _run_flower(log, split, server, train, config, record)
        report = None  # user vectors stay on the simulated devices: only HR/NDCG are reported
    if len(history) != server.rounds:
        raise RuntimeError(f"simulation finished {len(history)} of {server.rounds} rounds")
    segmented = algorithm(config.algorithm).segments
    picking = choice_epsilon(config.segments, server, log.num_users) if segmented else None
    results = build_results(log, split, server, train, history, picking)
    results["backend"] = config.backend
    results["beyond_accuracy"] = report
    results["algorithm"] = config.algorithm
    results["heterogeneity"] = {"availability": config.availability, "data_skew": config.data_skew}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curve(results, out / "curve.png")
    return results


def _run_flower(log: EventLog, split: Split, server: ServerConfig, train: TrainConfig,
                config: SimulationConfig, record: Callable[[RoundRecord], None]) -> None:
    """The real ServerApp and ClientApp in Flower's simulation engine, one store per user."""
    from flwr.simulation import run_simulation

    from attune.client.flower_app import make_client_app
    from attune.server.app import make_server_app

    out = config.out
    vocabulary = write_devices(log, split, out)
    signing_key, public_key = out / "keys" / "coordinator.pem", out / "keys" / "coordinator.pub.pem"
    generate_keypair(signing_key, public_key)  # every model the devices adopt is signed
    server = replace(server, signing_key=signing_key)
    privacy = PrivacyConfig(
        epsilon_budget=server.target_epsilon if train.private and server.target_epsilon else 1e9,
        delta=server.delta, min_events=config.min_events, allow_non_private=not train.private,
    )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=make_server_app(server, record),
        client_app=make_client_app(_settings_resolver(out, vocabulary, privacy, server.seed, public_key)),
        num_supernodes=log.num_users,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"log_to_driver": False, "include_dashboard": False}},
    )


def _r(value: float) -> float:
    return round(float(value), 6)  # aggregation order varies by a few ulps; reports do not


def build_results(log: EventLog, split, server: ServerConfig, train: TrainConfig,
                  history: list[RoundRecord], choice_epsilon: float | None = None) -> dict:
    """The results document; ``privacy.history_max`` is the ledger of the device that spent the
    most (training steps, and its segment choices under IFCA), so its epsilon is recomputable."""
    rounds = [
        {
            "round": h.round,
            "hr@10": _r(h.evaluate.get("hr@10", float("nan"))),
            "ndcg@10": _r(h.evaluate.get("ndcg@10", float("nan"))),
            "epsilon_max": _r(h.train.get("epsilon-max", 0.0)),
            "loss": _r(h.train.get("loss", float("nan"))),
            "devices_trained": int(h.train.get("devices-trained", 0)),
        }
        for h in history
    ]
    top = max(history, key=lambda h: h.train.get("epsilon-max", 0.0))
    last = history[-1]
    private = train.private
    steps_max = int(top.train.get("steps-max", 0))
    rate = _r(top.train.get("sample-rate-max", train.sample_rate))
    picked = choices(choice_epsilon, steps_max // train.steps_per_round) if choice_epsilon else []
    ledger = [(train.noise_multiplier, rate, steps_max), *picked]
    return {
        "label": "DP (event-level)" if private else "NON-PRIVATE: no differential privacy",
        "private": private,
        "dataset": {"name": log.name, "users": log.num_users, "items": log.num_items,
                    "events": len(log)},
        "final": {"hr@10": _r(last.evaluate.get("hr@10", float("nan"))),
                  "ndcg@10": _r(last.evaluate.get("ndcg@10", float("nan")))},
        "baseline": {"popular": {k: _r(v) for k, v in popularity_baseline(log, split).items()}},
        "rounds": rounds,
        "privacy": {
            "unit": "event",
            "private": private,
            "delta": server.delta,
            "epsilon_max": _r(top.train.get("epsilon-max", 0.0)) if private else None,
            "noise_multiplier": train.noise_multiplier if private else 0.0,
            "max_grad_norm": train.max_grad_norm,
            "sample_rate": rate,
            "steps_max": steps_max,
            "choice_epsilon": choice_epsilon,
            "history_max": [list(entry) for entry in ledger] if private else [],
            "accountant": ACCOUNTANT_NAME,
        },
        "config": {
            "rounds": server.rounds, "clients_per_round": server.clients_per_round or log.num_users,
            "server_lr": server.server_lr, "seed": server.seed,
            "model": asdict(server.model), "train": asdict(train),
        },
    }


def plot_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in results["rounds"]]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(rounds, [r["hr@10"] for r in results["rounds"]], marker="o", label="HR@10")
    left.axhline(results["baseline"]["popular"]["hr@10"], ls="--", c="grey", label="popular HR@10")
    left.set_xlabel("round")
    left.set_ylabel("HR@10")
    right = left.twinx()
    right.plot(rounds, [r["epsilon_max"] for r in results["rounds"]], c="tab:red", marker=".",
               label="epsilon (max device)")
    right.set_ylabel("epsilon")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower right", fontsize=8)
    left.set_title(results["label"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def server_config(
    *, rounds: int, clients_per_round: int, local_epochs: float, user_epochs: float,
    epsilon: float | None, delta: float, noise_multiplier: float | None, max_grad_norm: float,
    sample_rate: float, lr: float, user_lr: float, server_lr: float, dim: int, no_dp: bool,
    seed: int, negatives: int = 4, context: bool = True, joint_user: bool = True,
    server_optimizer: str = "sgd", aggregation: str = "mean", update_clip: float = 0.0,
    user_epsilon: float | None = None,
) -> ServerConfig:
    """Validate simulation options into a ServerConfig (the noise is calibrated later if unset)."""
    if epsilon is not None and epsilon <= 0:
        raise ConfigError(f"--epsilon must be > 0, got {epsilon}")
    if noise_multiplier is not None and noise_multiplier <= 0:
        raise ConfigError(f"--noise-multiplier must be > 0, got {noise_multiplier}")
    train = TrainConfig(
        local_epochs=local_epochs, user_epochs=user_epochs, sample_rate=sample_rate, lr=lr,
        user_lr=user_lr, noise_multiplier=noise_multiplier or 1.0, max_grad_norm=max_grad_norm,
        private=not no_dp, negatives=negatives, joint_user=joint_user, update_clip=update_clip,
    )
    return ServerConfig(
        rounds=rounds, clients_per_round=clients_per_round, server_lr=server_lr,
        server_optimizer=server_optimizer,
        target_epsilon=None if (no_dp or noise_multiplier is not None) else epsilon,
        delta=delta, seed=seed, model=ModelConfig(num_items=2, dim=dim, use_context=context),
        train=train, aggregation=aggregation, user_target_epsilon=user_epsilon,
        noise_seed=seed,  # a simulation is reproducible; a deployment's noise is never seeded
    )
