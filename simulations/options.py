"""Command-line options built from the config dataclasses, so every default is written once.

Each field of ``ServerConfig``, its ``ModelConfig`` and ``RoundConfig``, ``SimulationConfig`` and
``DataSource`` (minus the ones a simulation sets itself) becomes one option with the field's help.
Options default to "unset": the chosen privacy mode's preset applies, and the help shows the
``distributed`` preset's value.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import MISSING, Field, fields, replace
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import typer

from attune.server.config import ServerConfig
from attune.shared.config import PrivacyMode, RoundConfig
from attune.shared.errors import ConfigError
from attune.shared.model import ModelConfig
from attune.simulations.runner import DataSource, SimulationConfig

# Set by the simulation itself (from the data, the plan or the output folder), not by a flag.
_SET_BY_SIMULATION = {"num_items", "num_event_types", "min_survivors", "user_every", "min_devices",
                      "noise_seed", "signing_key", "resume", "out_dir", "round_timeout", "device_privacy",
                      "model", "round", "out", "source", "server"}
ALIASES = {"target_epsilon": ["--epsilon"], "path": ["--data"], "use_context": ["--context/--no-context"]}
SECTIONS: tuple[tuple[str, type], ...] = (("server", ServerConfig), ("model", ModelConfig), ("round", RoundConfig),
                                          ("simulation", SimulationConfig), ("source", DataSource))


def _base_type(annotation: Any) -> type:
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    return str if isinstance(annotation, type) and issubclass(annotation, Enum) else annotation  # checked by the config


def option_fields() -> list[tuple[str, Field, type]]:
    """``(section, field, type)`` of every option, in a stable order."""
    out = []
    for section, klass in SECTIONS:
        hints = get_type_hints(klass)
        for f in fields(klass):
            if f.name not in _SET_BY_SIMULATION and f.init:
                out.append((section, f, _base_type(hints[f.name])))
    return out


def _shown_default(section: str, f: Field) -> object:
    preset = ServerConfig.preset(PrivacyMode.DISTRIBUTED)
    holder = {"server": preset, "model": preset.model, "round": preset.round}.get(section)
    if holder is not None:
        return getattr(holder, f.name)
    return f.default if f.default is not MISSING else None


def parameters() -> list[inspect.Parameter]:
    """typer parameters for ``option_fields``: every one defaults to ``None`` (preset applies)."""
    params = []
    for section, f, kind in option_fields():
        flag = "--" + f.name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        if f.name in ALIASES:
            names = ALIASES[f.name] if kind is bool else [flag, *ALIASES[f.name]]
        help_text = f"{f.metadata.get('help', '')} [default: {_shown_default(section, f)}]"
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=typer.Option(None, *names, help=help_text, show_default=False),
                                        annotation=kind | None))
    return params


def with_options(function: Callable[..., None], extra: list[inspect.Parameter]) -> Callable[..., None]:
    """``function`` with a signature typer reads: ``extra`` parameters, then every option."""
    function.__signature__ = inspect.Signature([*extra, *parameters()])  # type: ignore[attr-defined]
    return function


def build(values: dict[str, Any], *, out: Path, **simulation: Any) -> SimulationConfig:
    """The simulation the options describe, validated (bad values fail here, before any work)."""
    given = {name: value for name, value in values.items() if value is not None}
    by_section: dict[str, dict[str, Any]] = {section: {} for section, _ in SECTIONS}
    for section, f, _ in option_fields():
        if f.name in given:
            by_section[section][f.name] = given[f.name]
    mode = by_section["round"].pop("mode", PrivacyMode.DISTRIBUTED.value)
    if "noise_multiplier" in given and "target_epsilon" not in given:  # an explicit noise, not calibrated
        by_section["server"]["target_epsilon"] = None
    try:
        server = ServerConfig.preset(mode)
        server = replace(server, **by_section["server"], model=replace(server.model, **by_section["model"]),
                         round=replace(server.round, **by_section["round"]))
        source = DataSource(**by_section["source"])
        return SimulationConfig(source=source, server=server, out=out, **{**by_section["simulation"], **simulation})
    except TypeError as error:
        raise ConfigError(str(error)) from None
