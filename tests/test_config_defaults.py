"""One source for every default: the Flower run config in pyproject.toml and the ``attune simulate``
options are generated from the config dataclasses, and agree with them."""

from pathlib import Path

import pytest
import tomllib

from attune.server.config import ServerConfig, run_config_defaults, run_config_keys, to_run_config
from attune.shared.config import PrivacyMode
from attune.shared.errors import ConfigError
from attune.simulations.options import build, option_fields

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_is_the_distributed_preset():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert listed == run_config_defaults()
    assert ServerConfig.from_run_config(listed) == ServerConfig.preset(PrivacyMode.DISTRIBUTED)


@pytest.mark.parametrize("mode", [m.value for m in PrivacyMode])
def test_a_mode_picked_in_the_run_config_brings_its_preset(mode):
    listed = run_config_defaults()
    assert ServerConfig.from_run_config({**listed, "mode": mode}) == ServerConfig.preset(mode)


@pytest.mark.parametrize("mode", [m.value for m in PrivacyMode])
def test_a_whole_run_config_written_for_a_run_reads_back_exactly(mode, tmp_path):
    # server-lr 0.1 is the distributed default but not off's: read with presets it would become 0.03
    config = ServerConfig.preset(mode, server_lr=0.1, rounds=7, out_dir=tmp_path, noise_seed=3)
    written = to_run_config(config)
    assert ServerConfig.from_run_config(written, exact=True) == config
    if mode == "off":
        assert ServerConfig.from_run_config(written).server_lr == 0.03


def test_cli_options_cover_every_field_and_default_to_the_presets(tmp_path):
    names = {f.name for _, f, _ in option_fields()}
    settable = {name for _, name in run_config_keys().values()} - {
        "num_items", "num_event_types", "min_survivors", "user_every", "min_devices", "noise_seed", "signing_key",
        "resume", "out_dir", "round_timeout"}
    assert settable <= names
    for mode in PrivacyMode:
        built = build({"mode": mode.value}, out=tmp_path)
        assert built.server == ServerConfig.preset(mode)


def test_unknown_or_bad_run_config_values_fail():
    with pytest.raises(ConfigError, match="unknown run config key"):
        ServerConfig.from_run_config({"colour": "blue"})
    with pytest.raises(ConfigError, match="aggregation"):
        ServerConfig.from_run_config({"aggregation": "foo"})
    with pytest.raises(ConfigError, match="distributed mode"):
        ServerConfig.from_run_config({"secure-aggregation": False})
