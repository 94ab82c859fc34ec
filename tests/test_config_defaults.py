"""One configuration pipeline: settings (given or absent) -> plan (derived) -> the signed round config.
The Flower run config in pyproject.toml and the ``attune simulate`` options are generated from the
config dataclasses and read by one parser; each settings bug of issue 21 is checked through both."""

from pathlib import Path

import pytest
import tomllib

from attune.server.config import MODE_PRESETS, ServerConfig, run_config_keys, run_config_toml, to_run_config
from attune.server.planning import plan
from attune.shared.config import PRESETS, PrivacyMode
from attune.shared.errors import ConfigError
from attune.simulations.options import build, option_fields

ROOT = Path(__file__).resolve().parents[1]
LISTED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_every_key_with_absent_values_as_blank():
    table = run_config_toml()
    assert table.split("\n", 1)[1] in (ROOT / "pyproject.toml").read_text(), (
        "regenerate pyproject.toml's [tool.flwr.app.config] from attune.server.config.run_config_toml()")
    assert LISTED == to_run_config(ServerConfig())
    assert ServerConfig.parse(LISTED) == ServerConfig()
    for derived in ("min-survivors", "user-every", "noise-multiplier", "server-lr", "target-epsilon"):
        assert LISTED[derived] == ""


def _both(tmp_path, **given) -> list[ServerConfig]:
    """The same settings through Flower's run config and through the ``attune simulate`` options."""
    run_config = {**LISTED, **{key.replace("_", "-"): value for key, value in given.items()}}
    flower = ServerConfig.parse(run_config)
    cli = build(given, out=tmp_path).server
    return [flower, cli]


@pytest.mark.parametrize("mode", [m.value for m in PrivacyMode])
def test_a_mode_brings_its_presets_for_what_was_not_given(tmp_path, mode):
    for settings in _both(tmp_path, mode=mode):
        planned = plan(settings, 100)
        assert planned.server_lr == MODE_PRESETS[PrivacyMode(mode)].server_lr
        assert planned.round.mode is PrivacyMode(mode)
        assert planned.round.negatives == PRESETS[PrivacyMode(mode)].negatives


def test_given_values_are_kept_never_replaced_by_a_derived_one(tmp_path):
    for settings in _both(tmp_path, min_survivors=7, user_every=3):
        planned = plan(settings, 100)
        assert planned.round.min_survivors == 7 and planned.round.user_every == 3  # were 90 and 10


def test_a_given_noise_multiplier_is_not_recalibrated(tmp_path):
    for settings in _both(tmp_path, noise_multiplier=3.0):
        planned = plan(settings, 100)
        assert planned.round.noise_multiplier == 3.0 and planned.target_epsilon is None  # was recalibrated to 7.651
    for settings in _both(tmp_path):
        assert plan(settings, 100).target_epsilon == 8.0  # absent both: the mode's target


def test_a_value_equal_to_a_listed_default_is_still_given(tmp_path):
    for settings in _both(tmp_path, mode="off", server_lr=0.1):
        assert plan(settings, 10).server_lr == 0.1  # was silently 0.03, off's preset


@pytest.mark.parametrize("given, message", [
    ({"noise_multiplier": 2.0, "target_epsilon": 4.0}, "noise-multiplier and target-epsilon were both given"),
    ({"min_survivors": 5, "min_survivor_fraction": 0.5}, "min-survivors and min-survivor-fraction"),
    ({"user_every": 5, "user_refreshes": 4}, "user-every and user-refreshes"),
    ({"mode": "local", "min_survivors": 5}, "min-survivors applies to distributed mode only"),
    ({"mode": "off", "noise_multiplier": 1.0}, "mode 'off' adds no noise"),
])
def test_contradicting_values_are_an_error_that_names_them(tmp_path, given, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig.parse({key.replace("_", "-"): value for key, value in given.items()})
    with pytest.raises(ConfigError, match=message):
        build(given, out=tmp_path)


def test_a_device_and_a_coordinator_at_their_defaults_complete_a_round(tmp_path):
    """No model passed anywhere: the device's default model is the coordinator's (it refused every
    round when the two defaults differed)."""
    import time

    from in_process_grid import InProcessGrid

    from attune import Event, Personalizer
    from attune.client.policy import PrivacyConfig
    from attune.client.settings import DeviceSettings
    from attune.server.app import transport_for
    from attune.server.coordinator import run
    from attune.shared.signing import generate_keypair

    generate_keypair(tmp_path / "c.pem", tmp_path / "c.pub.pem")
    devices = {}
    for node in range(3):
        path = tmp_path / f"d{node}.sqlite"
        with Personalizer(path) as device:
            device.record_many(Event(f"article:{node * 7 + i}", "click", time.time() - 60 + i) for i in range(20))
            device.grant_consent("policy-1")
        devices[node] = DeviceSettings(store_path=path, privacy=PrivacyConfig(),
                                       coordinator_public_key=tmp_path / "c.pub.pem")
    settings = ServerConfig(rounds=20, min_devices=3, signing_key=tmp_path / "c.pem")
    history = run(transport_for(InProcessGrid(devices), settings), settings)
    assert history[0].contributed == 3 and history[0].aborted == ""


@pytest.mark.parametrize("mode", [m.value for m in PrivacyMode])
def test_a_whole_run_config_written_for_a_run_reads_back_exactly(mode, tmp_path):
    config = ServerConfig(mode=mode, server_lr=0.1, rounds=7, out_dir=tmp_path, noise_seed=3)
    assert ServerConfig.parse(to_run_config(config)) == config


def test_cli_options_cover_every_setting(tmp_path):
    names = {f.name for _, f, _ in option_fields()}
    settable = {name for _, name in run_config_keys().values()} - {
        "num_items", "num_event_types", "architecture", "min_devices", "noise_seed", "signing_key", "resume",
        "out_dir", "round_timeout"}
    assert settable <= names
    assert build({}, out=tmp_path).server == ServerConfig()


def test_unknown_or_bad_run_config_values_fail():
    with pytest.raises(ConfigError, match="unknown run config key"):
        ServerConfig.parse({"colour": "blue"})
    with pytest.raises(ConfigError, match="aggregation"):
        ServerConfig.parse({"aggregation": "foo"})
    with pytest.raises(ConfigError, match="distributed mode"):
        ServerConfig.parse({"secure-aggregation": False})
    with pytest.raises(ConfigError, match="rounds must be an integer"):
        ServerConfig.parse({"num-server-rounds": ""})  # blank means absent only where absent is allowed


def test_the_deployed_server_app_refuses_a_noise_seed():
    """A seed makes the coordinator's sampling and device-level noise reproducible (issue 19, item 5)."""
    from flwr.app import Context, RecordDict

    from attune.server.app import app, deployable

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=to_run_config(ServerConfig(noise_seed=3)))
    with pytest.raises(ConfigError, match="noise-seed is for simulations only"):
        app(None, context)  # refused before the grid is touched
    assert deployable(ServerConfig()) == ServerConfig()
