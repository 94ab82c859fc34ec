"""Command-line options built from the config dataclasses, so every default is written once.

Each field of ``ServerConfig``, its ``ModelConfig`` and ``RoundSettings``, ``SimulationConfig``,
``TagAffinity`` and ``DataSource`` (minus the ones a simulation sets itself) becomes one option with
the field's help, in a help panel (data, privacy, training, run). Every option defaults to absent:
the coordinator's settings get only what was typed (``ServerConfig.parse``, the same parser as
Flower's run config), and the help shows what an absent value becomes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, fields
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import typer
from rich.markup import escape

from attune.server.config import ServerConfig
from attune.shared.config import PRESETS, PrivacyMode, RoundSettings
from attune.shared.errors import ConfigError
from attune.shared.model import ModelConfig
from attune.shared.tags import TagAffinity
from attune.simulations.runner import DataSource, SimulationConfig

# Set by the simulation itself (from the data or the output folder), not by a flag.
_SET_BY_SIMULATION = {"num_items", "num_event_types", "architecture", "min_devices", "noise_seed", "signing_key",
                      "resume", "out_dir", "round_timeout", "device_privacy", "model", "round", "out", "source",
                      "server", "tag_affinity"}
ALIASES = {"target_epsilon": ["--epsilon"], "path": ["--data"], "use_context": ["--context"]}
SECTIONS: tuple[tuple[str, type], ...] = (("server", ServerConfig), ("model", ModelConfig),
                                          ("round", RoundSettings), ("simulation", SimulationConfig),
                                          ("ranking", TagAffinity), ("source", DataSource))
DATA = SECTIONS[-1:]
_PRIVACY = {"mode", "target_epsilon", "delta", "user_share", "user_refreshes", "min_survivor_fraction",
            "device_level_noise", "device_level_epsilon", "device_level_delta", "secure_aggregation", "clip",
            "noise_multiplier", "min_survivors", "colluders", "device_norm", "quantum_bits", "user_every",
            "user_clip", "user_noise_multiplier", "noise"}
_RUN = {"rounds", "devices_per_round", "seed", "backend", "evaluations", "availability", "aggregation",
        "trim_fraction"}


def _panel(section: str, name: str) -> str:
    if section == "source" or name == "data_skew":
        return "Data"
    if name in _PRIVACY:
        return "Privacy"
    return "Run" if name in _RUN else "Training"


def _base_type(annotation: Any) -> type:
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return str if isinstance(annotation, type) and issubclass(annotation, Enum) else annotation  # checked by the config


def option_fields(sections: tuple[tuple[str, type], ...] = SECTIONS) -> list[tuple[str, Field, type]]:
    """``(section, field, type)`` of every option of ``sections``, in a stable order."""
    out = []
    for section, klass in sections:
        hints = get_type_hints(klass)
        for f in fields(klass):
            if f.name not in _SET_BY_SIMULATION and f.init:
                out.append((section, f, _base_type(hints[f.name])))
    return out


def _shown_default(section: str, f: Field) -> str:
    """What an absent option becomes (a mode or plan default is in the field's help already)."""
    if section == "round":
        if f.name in ("min_survivors", "user_every", "noise_multiplier", "user_noise_multiplier"):
            return " [derived by the plan]"
        value = asdict(PRESETS[PrivacyMode.DISTRIBUTED])[f.name]
        return f" [default: {value.value if isinstance(value, Enum) else value}]"
    if f.default is None or "[" in f.metadata.get("help", ""):
        return ""
    default = f.default if f.default is not MISSING else None
    return f" [default: {default.value if isinstance(default, Enum) else default}]"


def parameters(sections: tuple[tuple[str, type], ...] = SECTIONS) -> list[inspect.Parameter]:
    """typer parameters for ``option_fields``: every one defaults to ``None`` (absent)."""
    params = []
    for section, f, kind in option_fields(sections):
        flag = "--" + f.name.replace("_", "-")
        names = [flag]  # a flag turns a switch on; off is every switch's default
        if f.name in ALIASES:
            names = ALIASES[f.name] if kind is bool else [flag, *ALIASES[f.name]]
        help_text = escape(f"{f.metadata.get('help', '')}{_shown_default(section, f)}")
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=typer.Option(None, *names, help=help_text, show_default=False,
                                                             rich_help_panel=_panel(section, f.name)),
                                        annotation=kind | None))
    return params


def with_options(function: Callable[..., None], extra: list[inspect.Parameter], *,
                 data_only: bool = False) -> Callable[..., None]:
    """``function`` with a signature typer reads: ``extra`` parameters, then every option (the
    data source's alone with ``data_only``)."""
    sections = DATA if data_only else SECTIONS
    function.__signature__ = inspect.Signature([*extra, *parameters(sections)])  # type: ignore[attr-defined]
    return function


def data_source(values: dict[str, Any]) -> DataSource:
    """The data source the options describe (the given ones; absent ones take their defaults)."""
    names = {f.name for _, f, _ in option_fields(DATA)}
    return DataSource(**{name: value for name, value in values.items() if name in names and value is not None})


def build(values: dict[str, Any], *, out: Path, **simulation: Any) -> SimulationConfig:
    """The simulation the options describe, validated (bad values fail here, before any work)."""
    given = {name: value for name, value in values.items() if value is not None}
    server: dict[str, Any] = {}
    others: dict[str, dict[str, Any]] = {"simulation": {}, "ranking": {}, "source": {}}
    for section, f, _ in option_fields():
        if f.name in given:
            if section in others:
                others[section][f.name] = given[f.name]
            else:
                server["num-server-rounds" if f.name == "rounds" else f.name.replace("_", "-")] = given[f.name]
    try:
        return SimulationConfig(source=data_source(others["source"]), server=ServerConfig.parse(server), out=out,
                                tag_affinity=TagAffinity(**others["ranking"]), **{**others["simulation"], **simulation})
    except TypeError as error:
        raise ConfigError(str(error)) from None
