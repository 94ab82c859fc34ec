"""The coordinator's run configuration, parsed once from Flower's run config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from attune.shared.config import TrainConfig
from attune.shared.errors import ConfigError
from attune.shared.model import ModelConfig


@dataclass(frozen=True)
class ServerConfig:
    """How the coordinator runs: rounds, cohort, server step, and what devices are asked to do.

    ``clients_per_round = 0`` means every connected device. When ``train.private`` is set and
    ``target_epsilon`` is given, the noise multiplier sent to devices is calibrated so that a
    device taking part in every round ends at ``target_epsilon`` (devices still enforce their own
    budget and refuse beyond it): that is the event-level guarantee.

    User-level DP on the aggregate is on when ``train.update_clip > 0`` and either
    ``user_noise_multiplier`` or ``user_target_epsilon`` is set (the latter calibrates the
    multiplier for ``rounds`` rounds and is also the budget the run stops at). ``aggregation``
    picks ``mean`` (example-weighted), ``trimmed-mean`` or ``median``; ``secure_aggregation`` runs
    training through SecAgg+, where the coordinator sees only the (unweighted) mean.
    ``signing_key`` (an Ed25519 PEM file) signs every model sent; ``resume`` continues from the
    last good checkpoint.
    """

    rounds: int = 3
    clients_per_round: int = 0
    min_clients: int = 2
    server_lr: float = 1.0
    server_optimizer: str = "sgd"
    fraction_evaluate: float = 1.0
    round_timeout: float = 0.0  # seconds to wait for replies; 0: wait for every sampled device
    target_epsilon: float | None = None
    delta: float = 1e-5
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    user_noise_multiplier: float = 0.0
    user_target_epsilon: float | None = None
    user_delta: float = 1e-5
    noise_seed: int | None = None  # seeds the aggregate's noise: simulations only
    signing_key: Path | None = None
    secure_aggregation: bool = False
    resume: bool = False
    seed: int = 0
    out_dir: Path | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.clients_per_round < 0 or self.min_clients < 1:
            raise ConfigError("clients_per_round must be >= 0 and min_clients >= 1")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ConfigError(f"epsilon must be > 0, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.user_target_epsilon is not None and self.user_target_epsilon <= 0:
            raise ConfigError(f"user_target_epsilon must be > 0, got {self.user_target_epsilon}")
        if self.user_level_dp and self.train.update_clip <= 0:
            raise ConfigError("user-level DP needs train.update_clip > 0 (devices clip their updates)")
        if self.secure_aggregation and self.aggregation != "mean":
            raise ConfigError("secure aggregation yields only the mean: use aggregation='mean'")
        if self.round_timeout < 0:
            raise ConfigError(f"round_timeout must be >= 0, got {self.round_timeout}")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume needs out_dir (where the checkpoints are)")
        if self.server_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"server_optimizer must be sgd or adam, got {self.server_optimizer!r}")

    @property
    def user_level_dp(self) -> bool:
        return self.user_noise_multiplier > 0 or self.user_target_epsilon is not None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> ServerConfig:
        """Read ``kebab-case`` keys (``num-server-rounds``, ``local-epochs``, ...); unknown keys fail."""
        known: dict[str, tuple[str, str]] = {"num-server-rounds": ("", "rounds")}
        for section, klass in (("", cls), ("model", ModelConfig), ("train", TrainConfig)):
            for f in fields(klass):
                if f.name not in ("model", "train"):
                    known.setdefault(f.name.replace("_", "-"), (section, f.name))
        values: dict[str, dict[str, object]] = {"": {}, "model": {}, "train": {}}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(f"unknown run config key {key!r}")
            section, name = known[key]
            values[section][name] = value
        top = values[""]
        for name in ("out_dir", "signing_key"):  # paths; "" means none
            if name in top:
                top[name] = Path(str(top[name])) if top[name] else None
        for name in ("target_epsilon", "user_target_epsilon"):  # 0 means none
            if top.get(name) in (0, 0.0, ""):
                top[name] = None
        if "noise_seed" in top and int(top["noise_seed"]) < 0:  # type: ignore[call-overload]
            top["noise_seed"] = None
        return cls(
            **top,  # type: ignore[arg-type]
            model=ModelConfig(**values["model"]),  # type: ignore[arg-type]
            train=TrainConfig(**values["train"]),  # type: ignore[arg-type]
        )
