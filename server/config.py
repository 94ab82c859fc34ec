"""The coordinator's settings: what a person gave, and nothing derived.

One pipeline turns them into rounds: ``ServerConfig`` (settings, read once at the edge by
``parse`` from the ``attune`` command's options or Flower's run config) -> ``plan`` (what is
derived: the mode's presets for what was not given, survivors, the refresh schedule, calibrated
noise; ``attune.server.planning``) -> the ``RoundConfig`` the plan signs and sends. A value is
*given* when it is present, never because it differs from a default; a field left ``None`` is
absent. Two given values that contradict each other are an error naming both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from attune.shared.config import PrivacyMode, RoundSettings, knob, validate
from attune.shared.errors import ConfigError
from attune.shared.model import ModelConfig


class Optimizer(str, Enum):
    """The coordinator's optimizer on the mean of the released sums."""

    ADAM = "adam"
    SGD = "sgd"


class Aggregation(str, Enum):
    """How contributions combine: their sum, or a rule robust to a minority of hostile devices
    (these need each contribution: no secure aggregation)."""

    SUM = "sum"
    TRIMMED_MEAN = "trimmed-mean"
    MEDIAN = "median"


@dataclass(frozen=True)
class ModePreset:
    """What a privacy mode brings for the coordinator's settings left absent (its round knobs are
    ``attune.shared.config.PRESETS``)."""

    server_lr: float
    secure_aggregation: bool
    target_epsilon: float | None  # unless a noise multiplier is given


MODE_PRESETS: dict[PrivacyMode, ModePreset] = {
    PrivacyMode.DISTRIBUTED: ModePreset(server_lr=0.1, secure_aggregation=True, target_epsilon=8.0),
    PrivacyMode.LOCAL: ModePreset(server_lr=0.1, secure_aggregation=False, target_epsilon=8.0),
    PrivacyMode.OFF: ModePreset(server_lr=0.03, secure_aggregation=False, target_epsilon=None),
}
DEFAULT_USER_REFRESHES = 10
DEFAULT_MIN_SURVIVOR_FRACTION = 0.9


@dataclass(frozen=True)
class ServerConfig:
    """How the coordinator runs a federation, as given.

    Each round samples devices (every connected device, or each with probability
    ``devices_per_round / connected`` from a secure source), sends the signed global model and
    round config, sums what comes back (under SecAgg+ when secure aggregation is on), divides by
    the expected cohort size and takes a server optimizer step. With a target epsilon the noise is
    calibrated so that a device in every planned round ends at it. Device-level DP (DP-FedAvg,
    McMahan et al. 2018) adds noise for all of one device's data together on top.
    """

    mode: PrivacyMode = knob(PrivacyMode.DISTRIBUTED, "privacy mode: distributed, local or off")
    rounds: int = knob(100, "federated rounds", low=1, high=10**6)
    devices_per_round: int = knob(0, "expected devices per round (each sampled with that chance); 0: all", low=0)
    min_devices: int = knob(2, "devices to wait for before the first round", low=1)
    server_optimizer: Optimizer = knob(Optimizer.ADAM, "adam or sgd, on the mean of the released sums")
    server_lr: float | None = knob(None, "server learning rate [mode preset: 0.1; off 0.03]", above=0.0)
    target_epsilon: float | None = knob(None, "per-device event-level epsilon the noise is calibrated to "
                                        "[private modes: 8, unless a noise multiplier is given]", above=0.0,
                                        high=1000.0)
    delta: float = knob(1e-5, "delta of the event-level guarantee", above=0.0, high=0.1)
    user_share: float = knob(0.3, "share of the event-level budget spent on refreshing user vectors",
                             low=0.0, high=0.95)
    count_share: float = knob(0.1, "share of the event-level budget spent on the count that selects the trained "
                              "items (models with trained_items)", low=0.0, high=0.9)
    eval_share: float = knob(0.0, "share of the event-level budget spent on evaluation rounds (federated HR@10 "
                             "under DP, attune.shared.evaluation); 0: no evaluation rounds", low=0.0, high=0.9)
    eval_every: int = knob(0, "an evaluation round after every this many training rounds (0: only after the "
                           "last); with eval-share > 0", low=0, high=10**6)
    min_item_count: float = knob(10.0, "events an item's noisy count must reach to get a trained row (models with "
                                 "trained_items)", low=0.0)
    user_refreshes: int | None = knob(None, "user-vector refreshes a device makes over its planned rounds "
                                      f"[{DEFAULT_USER_REFRESHES}, unless user-every is given]", low=1)
    min_survivor_fraction: float | None = knob(None, "distributed: share of a round's cohort (of its lower tail "
                                               "under sampling) whose noise shares must be in the released sum "
                                               f"[{DEFAULT_MIN_SURVIVOR_FRACTION}, unless min-survivors is given]",
                                               above=0.0, high=1.0)
    device_level_noise: float | None = knob(None, "device-level DP (DP-FedAvg) noise multiplier on the sum", above=0.0)
    device_level_epsilon: float | None = knob(None, "device-level epsilon over all rounds (calibrates the noise "
                                              "and stops the run at it)", above=0.0, high=1000.0)
    device_level_delta: float = knob(1e-5, "delta of the device-level guarantee", above=0.0, high=0.1)
    aggregation: Aggregation = knob(Aggregation.SUM, "sum, trimmed-mean or median (the last two need each "
                                    "contribution: no secure aggregation)")
    trim_fraction: float = knob(0.1, "trimmed-mean: share cut at each end", low=0.0, high=0.49)
    secure_aggregation: bool | None = knob(None, "sum contributions under SecAgg+ [distributed: required; "
                                           "local and off: no]")
    round_timeout: float = knob(0.0, "seconds to wait for replies; 0: wait for every sampled device", low=0.0)
    noise_seed: int | None = knob(None, "simulations only: seeds the coordinator's noise and sampling", low=0)
    signing_key: Path | None = knob(None, "Ed25519 key that signs every round")
    resume: bool = knob(False, "continue from the newest checkpoint that verifies")
    seed: int = knob(0, "seed of the initial model (and of everything in simulations)", low=0, high=2**63 - 1)
    out_dir: Path | None = knob(None, "where checkpoints and rounds.jsonl go")
    keep_checkpoints: int = knob(5, "round checkpoints kept in out-dir/checkpoints, the newest (0: every round's; "
                                 "global_final.pt is always the last)", low=0, high=10**6)
    model: ModelConfig = field(default_factory=ModelConfig)
    round: RoundSettings = field(default_factory=RoundSettings)

    def __post_init__(self) -> None:
        validate(self)
        given, mode = self.round.given(), self.mode
        both = [(a, b) for a, b, present in (
            ("noise-multiplier", "target-epsilon", "noise_multiplier" in given and self.target_epsilon is not None),
            ("user-noise-multiplier", "target-epsilon",
             "user_noise_multiplier" in given and self.target_epsilon is not None),
            ("min-survivors", "min-survivor-fraction",
             "min_survivors" in given and self.min_survivor_fraction is not None),
            ("user-every", "user-refreshes", "user_every" in given and self.user_refreshes is not None),
            ("device-level-noise", "device-level-epsilon",
             self.device_level_noise is not None and self.device_level_epsilon is not None)) if present]
        if both:
            a, b = both[0]
            raise ConfigError(f"{a} and {b} were both given: {b} calibrates {a}; give one of them")
        if mode is PrivacyMode.OFF:
            if self.target_epsilon is not None:
                raise ConfigError("target_epsilon needs a private mode; unset it for mode 'off'")
            for name in ("noise_multiplier", "user_noise_multiplier"):
                if given.get(name):
                    raise ConfigError(f"mode 'off' adds no noise: {name.replace('_', '-')} must not be given")
        if mode is not PrivacyMode.DISTRIBUTED:
            for name in ("min_survivors", "colluders"):
                if name in given:
                    raise ConfigError(f"{name.replace('_', '-')} applies to distributed mode only (mode is "
                                      f"{mode.value})")
            if self.min_survivor_fraction is not None:
                raise ConfigError(f"min-survivor-fraction applies to distributed mode only (mode is {mode.value})")
        secure = self.uses_secure_aggregation
        if mode is PrivacyMode.DISTRIBUTED and not secure:
            raise ConfigError("distributed mode adds only a share of the noise on each device: it needs "
                              "secure_aggregation=true, or the coordinator would see under-noised updates")
        if secure and mode is PrivacyMode.OFF:
            raise ConfigError("secure aggregation sums integer (private) contributions: mode 'off' cannot use it")
        if self.aggregation is not Aggregation.SUM and secure:
            raise ConfigError(f"{self.aggregation.value} needs every contribution; secure aggregation yields only "
                              "their sum")
        if self.aggregation is not Aggregation.SUM and self.device_level_dp:
            raise ConfigError("device-level DP bounds the sum's sensitivity: use aggregation='sum'")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume needs out_dir (where the checkpoints are)")

    @property
    def preset(self) -> ModePreset:
        return MODE_PRESETS[self.mode]

    @property
    def uses_secure_aggregation(self) -> bool:
        """Given, or the mode's: SecAgg+ in distributed mode only."""
        return self.preset.secure_aggregation if self.secure_aggregation is None else self.secure_aggregation

    @property
    def device_level_dp(self) -> bool:
        return self.device_level_noise is not None or self.device_level_epsilon is not None

    @classmethod
    def parse(cls, given: Mapping[str, object]) -> ServerConfig:
        """The settings from given values by run-config key (``kebab-case`` field names of this class,
        its ``model`` and its ``round``; ``num-server-rounds`` is ``rounds``): what both the
        ``attune`` command and Flower's run config hand in. An absent key is absent; ``""`` is
        absent too (``pyproject.toml`` lists it for every value a mode or the plan derives).
        Unknown keys fail."""
        known = run_config_keys()
        sections: dict[str, dict[str, Any]] = {"": {}, "model": {}, "round": {}}
        for key, value in given.items():
            if key not in known:
                raise ConfigError(f"unknown run config key {key!r}")
            if value == "" and key in _ABSENT:
                continue
            section, name = known[key]
            sections[section][name] = value
        try:
            return cls(**sections[""], model=ModelConfig(**sections["model"]), round=RoundSettings(**sections["round"]))
        except TypeError as error:
            raise ConfigError(f"bad run config value: {error}") from None


def run_config_keys() -> dict[str, tuple[str, str]]:
    """Every run config key and where it goes: ``(section, field)`` with section "", "model" or
    "round"."""
    known: dict[str, tuple[str, str]] = {"num-server-rounds": ("", "rounds")}
    for section, klass in (("", ServerConfig), ("model", ModelConfig), ("round", RoundSettings)):
        for f in fields(klass):
            if f.name not in ("model", "round", "rounds"):
                key = f.name.replace("_", "-")
                if key in known:
                    raise RuntimeError(f"run config key {key!r} is ambiguous")
                known[key] = (section, f.name)
    return known


# Keys that may be absent: every field whose default is None.
_ABSENT = {key for key, (section, name) in run_config_keys().items()
           if next(f for f in fields({"": ServerConfig, "model": ModelConfig, "round": RoundSettings}[section])
                   if f.name == name).default is None}


def to_run_config(config: ServerConfig) -> dict[str, object]:
    """``config`` as Flower's run config, every key: absent values as ``""``, enums and paths as
    strings. ``ServerConfig.parse`` reads it back to the same settings."""
    out: dict[str, object] = {}
    for key, (section, name) in run_config_keys().items():
        value = getattr({"": config, "model": config.model, "round": config.round}[section], name)
        if value is None:
            value = ""
        elif isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out


def run_config_toml() -> str:
    """``pyproject.toml``'s ``[tool.flwr.app.config]`` table: every key at ``ServerConfig()``,
    each absent one with what it becomes (``tests/test_config_defaults.py`` checks they agree)."""
    helps = {f.name: f.metadata.get("help", "") for klass in (ServerConfig, ModelConfig, RoundSettings)
             for f in fields(klass)}
    lines = []
    for key, value in to_run_config(ServerConfig()).items():
        line = f"{key} = {json.dumps(value)}"
        if key in _ABSENT:
            name = run_config_keys()[key][1]
            default = re.search(r"\[(.*)\]", helps[name])
            what = default.group(1) if default else (
                "derived by the plan" if name in _DERIVED else "none" if section_of(key) == "" else "the mode's preset")
            line = f"{line:<28}# absent: {what}"
        lines.append(line)
    return "\n".join(["[tool.flwr.app.config]", *lines])


def section_of(key: str) -> str:
    return run_config_keys()[key][0]


_DERIVED = {"min_survivors", "user_every", "noise_multiplier", "user_noise_multiplier"}


def with_round(config: ServerConfig, **given: Any) -> ServerConfig:
    """``config`` with more round knobs given."""
    return replace(config, round=replace(config.round, **given))
