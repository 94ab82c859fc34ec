"""The coordinator's run configuration: one frozen dataclass, the only source of every default.

``ServerConfig.preset(mode)`` gives the defaults of a privacy mode (``PRESET_CHANGES`` plus the
round preset of ``attune.shared.config``); ``from_run_config`` reads Flower's run config (kebab-case
keys, starting from the preset its ``mode`` names), and the ``attune`` command builds its options
from these same fields, so a default is written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path

from attune.shared.config import PrivacyMode, RoundConfig, knob, preset
from attune.shared.errors import ConfigError
from attune.shared.model import ModelConfig

OPTIMIZERS = ("adam", "sgd")
AGGREGATIONS = ("sum", "trimmed-mean", "median")


@dataclass(frozen=True)
class ServerConfig:
    """How the coordinator runs a federation.

    Each round samples devices (every connected device, or each with probability
    ``devices_per_round / connected`` from a secure source), sends the signed global model and
    ``round`` config, sums what comes back (under SecAgg+ when ``secure_aggregation``), divides
    by the expected cohort size and takes a server optimizer step. With ``target_epsilon`` the
    noise of ``round`` is calibrated so that a device in every planned round ends at it.
    ``device_level_noise`` (or ``device_level_epsilon``) adds DP-FedAvg noise for all of one
    device's data together on top (McMahan et al. 2018).
    """

    rounds: int = knob(100, "federated rounds")
    devices_per_round: int = knob(0, "expected devices per round (each sampled with that chance); 0: all")
    min_devices: int = knob(2, "devices to wait for before the first round")
    server_optimizer: str = knob("adam", "adam or sgd, on the mean of the released sums")
    server_lr: float = knob(0.1, "server learning rate")
    target_epsilon: float | None = knob(8.0, "per-device event-level epsilon the noise is calibrated to")
    delta: float = knob(1e-5, "delta of the event-level guarantee")
    user_share: float = knob(0.3, "share of the event-level budget spent on refreshing user vectors")
    user_refreshes: int = knob(10, "user-vector refreshes a device makes over its planned rounds")
    min_survivor_fraction: float = knob(0.9, "distributed: share of a round's cohort whose noise shares "
                                        "must be in the released sum (of its lower tail under sampling)")
    device_level_noise: float = knob(0.0, "device-level DP (DP-FedAvg) noise multiplier on the sum; 0: off")
    device_level_epsilon: float | None = knob(None, "device-level epsilon over all rounds (calibrates the "
                                              "noise and stops the run at it)")
    device_level_delta: float = knob(1e-5, "delta of the device-level guarantee")
    aggregation: str = knob("sum", "sum, trimmed-mean or median (the last two need each contribution: "
                            "no secure aggregation)")
    trim_fraction: float = knob(0.1, "trimmed-mean: share cut at each end")
    secure_aggregation: bool = knob(True, "sum contributions under SecAgg+ (required by distributed mode)")
    round_timeout: float = knob(0.0, "seconds to wait for replies; 0: wait for every sampled device")
    noise_seed: int | None = knob(None, "simulations only: seeds the coordinator's noise and sampling")
    signing_key: Path | None = knob(None, "Ed25519 key that signs every round")
    resume: bool = knob(False, "continue from the newest checkpoint that verifies")
    seed: int = knob(0, "seed of the initial model (and of everything in simulations)")
    out_dir: Path | None = knob(None, "where checkpoints and rounds.jsonl go")
    model: ModelConfig = field(default_factory=ModelConfig)
    round: RoundConfig = field(default_factory=RoundConfig)

    def __post_init__(self) -> None:
        for name, low in (("rounds", 1), ("devices_per_round", 0), ("min_devices", 1), ("user_refreshes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.server_optimizer not in OPTIMIZERS:
            raise ConfigError(f"server_optimizer must be one of {', '.join(OPTIMIZERS)}, "
                              f"got {self.server_optimizer!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        checks = [("server_lr", self.server_lr, 0.0, False), ("delta", self.delta, 0.0, False),
                  ("device_level_delta", self.device_level_delta, 0.0, False),
                  ("user_share", self.user_share, 0.0, True), ("trim_fraction", self.trim_fraction, 0.0, True),
                  ("device_level_noise", self.device_level_noise, 0.0, True),
                  ("round_timeout", self.round_timeout, 0.0, True),
                  ("min_survivor_fraction", self.min_survivor_fraction, 0.0, False)]
        for name, value, low, inclusive in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (not inclusive and value == low):
                raise ConfigError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low}, "
                                  f"got {value!r}")
        for name in ("delta", "device_level_delta", "min_survivor_fraction"):
            if getattr(self, name) > 1 or (name != "min_survivor_fraction" and getattr(self, name) == 1):
                raise ConfigError(f"{name} must be below 1, got {getattr(self, name)}")
        if self.user_share >= 1 or self.trim_fraction >= 0.5:
            raise ConfigError("user_share must be < 1 and trim_fraction < 0.5")
        for name in ("target_epsilon", "device_level_epsilon"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{name} must be a finite number > 0 (or unset), got {value!r}")
        if self.target_epsilon is not None and not self.round.private:
            raise ConfigError("target_epsilon needs a private mode; unset it for mode 'off'")
        if self.round.privacy is PrivacyMode.DISTRIBUTED and not self.secure_aggregation:
            raise ConfigError("distributed mode adds only a share of the noise on each device: it needs "
                              "secure_aggregation=true, or the coordinator would see under-noised updates")
        if self.secure_aggregation and not self.round.private:
            raise ConfigError("secure aggregation sums integer (private) contributions: mode 'off' cannot use it")
        if self.aggregation != "sum" and self.secure_aggregation:
            raise ConfigError(f"{self.aggregation} needs every contribution; secure aggregation yields only "
                              "their sum")
        if self.aggregation != "sum" and self.device_level_dp:
            raise ConfigError("device-level DP bounds the sum's sensitivity: use aggregation='sum'")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume needs out_dir (where the checkpoints are)")

    @property
    def device_level_dp(self) -> bool:
        return self.device_level_noise > 0 or self.device_level_epsilon is not None

    @property
    def mode(self) -> PrivacyMode:
        return self.round.privacy

    @classmethod
    def preset(cls, mode: PrivacyMode | str = PrivacyMode.DISTRIBUTED, **changes: object) -> ServerConfig:
        """The defaults of ``mode`` (rounds, optimizer, model and round config), with ``changes``."""
        base = preset(mode)  # validates the mode's name
        base = cls(round=base, **PRESET_CHANGES[base.privacy])  # type: ignore[arg-type]
        return replace(base, **changes)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object], *, exact: bool = False) -> ServerConfig:
        """Read Flower's run config: ``kebab-case`` field names of this class, its ``model`` and its
        ``round`` (``num-server-rounds`` is ``rounds``). Unknown keys fail. ``pyproject.toml`` lists
        every key at the ``distributed`` preset (``run_config_defaults``): a key left at that value
        takes the preset of the chosen ``mode`` instead, unless ``exact`` (a run config written
        whole by ``to_run_config``); ``0``, ``""`` or ``-1`` mean unset for optional values."""
        known = run_config_keys()
        listed = run_config_defaults()
        mode = str(run_config.get("mode", PrivacyMode.DISTRIBUTED.value))
        base = cls.preset(mode)
        values: dict[str, dict[str, object]] = {"": {}, "model": {}, "round": {}}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(f"unknown run config key {key!r}")
            if not exact and key != "mode" and value == listed[key] and type(value) is type(listed[key]):
                continue  # left at the listed default: the mode's preset applies
            section, name = known[key]
            values[section][name] = value
        top = values[""]
        for name in ("out_dir", "signing_key"):
            if name in top:
                top[name] = Path(str(top[name])) if top[name] else None
        for name in ("target_epsilon", "device_level_epsilon", "noise_seed"):
            if top.get(name, "set") in (0, 0.0, "", -1):
                top[name] = None
        try:
            return replace(base, **top, model=replace(base.model, **values["model"]),  # type: ignore[arg-type]
                           round=replace(base.round, **values["round"]))
        except TypeError as error:
            raise ConfigError(f"bad run config value: {error}") from None


# What each mode changes in ServerConfig's defaults (its round config comes from shared.config).
PRESET_CHANGES: dict[PrivacyMode, dict[str, object]] = {
    PrivacyMode.DISTRIBUTED: {},
    PrivacyMode.LOCAL: {"secure_aggregation": False},
    PrivacyMode.OFF: {"target_epsilon": None, "secure_aggregation": False, "server_lr": 0.03},
}


_UNSET = {"out_dir": "", "signing_key": "", "target_epsilon": 0.0, "device_level_epsilon": 0.0, "noise_seed": -1}


def run_config_defaults(mode: PrivacyMode | str = PrivacyMode.DISTRIBUTED) -> dict[str, object]:
    """Every run config key with the value of ``mode``'s preset (``pyproject.toml`` lists these)."""
    return to_run_config(ServerConfig.preset(mode))


def to_run_config(config: ServerConfig) -> dict[str, object]:
    """``config`` as Flower's run config, every key (unset optional values are written as ``""``,
    ``0.0`` or ``-1``, which ``from_run_config`` reads back as unset); paths as strings."""
    out: dict[str, object] = {}
    for key, (section, name) in run_config_keys().items():
        holder = {"": config, "model": config.model, "round": config.round}[section]
        value = getattr(holder, name)
        if value is None:
            value = _UNSET[name]
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, Enum):
            value = value.value
        out[key] = value
    return out


def run_config_keys() -> dict[str, tuple[str, str]]:
    """Every run config key and where it goes: ``(section, field)`` with section "", "model" or
    "round"."""
    known: dict[str, tuple[str, str]] = {"num-server-rounds": ("", "rounds")}
    for section, klass in (("", ServerConfig), ("model", ModelConfig), ("round", RoundConfig)):
        for f in fields(klass):
            if f.name not in ("model", "round", "rounds"):
                key = f.name.replace("_", "-")
                if key in known:
                    raise RuntimeError(f"run config key {key!r} is ambiguous")
                known[key] = (section, f.name)
    return known
