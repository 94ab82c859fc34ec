"""End to end through Flower's Deployment Engine on 127.0.0.1: a SuperLink and SuperNodes with TLS
and SuperNode authentication run the Attune app. A SuperNode is killed mid-round, then the
ServerApp is killed and the run resumed, and ends with an evaluation round. Every process started
is stopped."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch

from attune import ModelConfig, Personalizer, Vocabulary
from attune.server.checkpoint import latest_checkpoint, load_checkpoint
from attune.simulations.datasets import synthetic
from attune.simulations.devices import held_out, store_path, write_devices
from attune.simulations.evaluation import leave_one_out
from attune.simulations.federation import FederationConfig, LocalFederation

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(1)


def _record_held_out(devices: Path, user: int, model) -> None:  # noqa: ANN001 - a ModelConfig
    vocabulary = Vocabulary.of(json.loads((devices / "vocabulary.json").read_text()))
    with Personalizer(store_path(devices, user), model=model, vocabulary=vocabulary) as device:
        device.record(held_out(devices, user))


@pytest.mark.slow
def test_deployment_engine_tls_node_auth_dead_supernode_and_resumed_server(tmp_path):
    log = synthetic(num_users=4, seed=0)
    vocabulary = write_devices(log, leave_one_out(log), tmp_path / "devices")
    stores = tuple(store_path(tmp_path / "devices", user) for user in range(4))
    out = tmp_path / "run"
    run_config = {  # distributed mode: every round through hardened SecAgg+ across the processes
        "num-server-rounds": 3, "min-devices": 3, "num-items": log.num_items, "dim": 8, "use-context": False,
        "target-epsilon": 4.0, "min-survivor-fraction": 0.5, "round-timeout": 120.0, "out-dir": out,
        "eval-share": 0.05,  # and a final evaluation round
        "keep-checkpoints": 0,  # every round's, for the checks below
    }
    config = FederationConfig(directory=tmp_path / "federation", stores=stores, app=ROOT,
                              vocabulary=vocabulary, port=_free_port())
    checkpoints = out / "checkpoints"
    with LocalFederation(config) as federation:
        run_config["signing-key"] = federation.credentials.signing_key
        assert b"BEGIN CERTIFICATE" in federation.credentials.ca_cert.read_bytes()
        first = federation.start_run(run_config)
        _wait_for(checkpoints / "global_round_0001.pt.sha256")
        federation.kill_supernode(3)  # a device vanishes while round 2 is running
        for user in range(3):  # the apps record what their people used, ranked with the model they hold
            _record_held_out(tmp_path / "devices", user, ModelConfig(num_items=log.num_items, dim=8))
        _wait_for(checkpoints / "global_round_0002.pt.sha256")
        assert federation.kill_serverapp() >= 1  # the coordinator dies after round 2
        first.kill()
        for run_id in federation.run_ids():
            federation.stop_run(run_id)
        stopped_at = latest_checkpoint(checkpoints)
        assert stopped_at is not None and stopped_at.round in (2, 3)
        assert federation.run({**run_config, "resume": True}) == 0
        rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2, 3, 4]
        evaluation = rounds[3]  # through SecAgg+ across the processes, like any round
        assert evaluation["task"] == "evaluate" and evaluation["contributed"] == 3 and evaluation["aborted"] == ""
        estimate = evaluation["evaluation"]
        assert abs(estimate["events"] - 3) < 5 * estimate["noise_std"]
        assert rounds[0]["contributed"] == 4 and rounds[0]["aborted"] == ""
        second = rounds[1]
        assert second["contributed"] == 3 and second["failed"] == 1  # SecAgg+ summed the three left
        epsilons = [r["epsilon"] for r in rounds]
        assert epsilons[0] < epsilons[1] < epsilons[2]  # the resumed run continued the participation
        final = load_checkpoint(checkpoints / "global_round_0004.pt")
        first = load_checkpoint(checkpoints / "global_round_0001.pt")
        assert final.run_id == first.run_id  # resumed as the same run: devices saw rounds move forward
        assert not torch.equal(final.state["item_embedding.weight"], first.state["item_embedding.weight"])
    time.sleep(1)
    assert federation.processes() == []  # every process started for the federation is gone
