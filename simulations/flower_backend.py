"""The Flower backend of ``attune simulate``: ``flwr run`` of the real ServerApp and ClientApp on a
SuperLink of its own (127.0.0.1, a free port) in Flower's simulation runtime, one virtual SuperNode
and one on-device store per user, every round signed, and in ``distributed`` mode every round
through hardened SecAgg+. The SuperLink and every process Flower starts for it stop with the run.

The coordinator runs in Flower's process; this one follows its ``rounds.jsonl`` and scores the
rounds the app saved for evaluation (``attune.simulations.flower_apps``) as they finish.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from attune.client.policy import PrivacyConfig
from attune.server.config import ServerConfig
from attune.server.coordinator import RoundRecord
from attune.shared.accounting import Entry, epsilon_of
from attune.shared.errors import ConfigError
from attune.shared.signing import generate_keypair
from attune.simulations.datasets import EventLog
from attune.simulations.devices import read_ledgers, write_devices
from attune.simulations.evaluation import Split
from attune.simulations.fast import Devices
from attune.simulations.federation import FederationConfig, LocalFederation
from attune.simulations.flower_apps import FINISHED, Harness, coordinator_keys, snapshot_path, write_app

Evaluate = Callable[[RoundRecord, dict[str, torch.Tensor], Callable[[], Devices]], None]
POLL_SECONDS = 0.5


def run_flower(log: EventLog, split: Split, server: ServerConfig, privacy: PrivacyConfig, evaluate_at: set[int],
               evaluate: Evaluate) -> tuple[list[Entry], list[Entry]]:
    """Run the federation; returns the ledger (and local ledger) of the device that spent most."""
    assert server.out_dir is not None
    out = server.out_dir.resolve()  # Flower's processes run elsewhere
    write_devices(log, split, out)
    signing_key, public_key = coordinator_keys(out)
    generate_keypair(signing_key, public_key)  # every round the devices join is signed
    server = replace(server, out_dir=out, signing_key=signing_key)
    (out / FINISHED).unlink(missing_ok=True)
    app = write_app(out, server, Harness(log.num_users, privacy, tuple(sorted(evaluate_at))))
    federation = LocalFederation(FederationConfig(directory=out / "flower", stores=(), app=app, port=0,
                                                  insecure=True, simulated_devices=log.num_users))
    with federation:
        run = federation.start_run({})
        _follow(out, run, evaluate_at, evaluate)
    if not (out / FINISHED).exists():
        raise ConfigError(f"the Flower run failed (flwr run exited with {run.returncode}); its log is in "
                          f"{federation.logs}")
    ledgers = read_ledgers(out, log.num_users)
    spent = [epsilon_of([e for row in rows for e in row.entries], server.delta) for rows in ledgers]
    top = max(range(len(ledgers)), key=lambda k: spent[k]) if ledgers else 0
    rows = ledgers[top] if ledgers else []
    return [e for row in rows for e in row.entries], [e for row in rows for e in row.local_entries]


def _follow(out: Path, run: subprocess.Popen, evaluate_at: set[int], evaluate: Evaluate) -> None:
    """Hand each round to ``evaluate`` as the run records it (with its saved model and user vectors
    on evaluated rounds), until the run ends."""
    done = 0
    while True:
        ended = run.poll() is not None  # read before the files: nothing is missed after the end
        path = out / "rounds.jsonl"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []  # whole lines only
        for line in lines[done:]:
            raw = json.loads(line)
            record = RoundRecord(**{**raw, "rejections": tuple(raw["rejections"])})
            saved = snapshot_path(out, record.round)
            if record.round in evaluate_at and not saved.exists():
                break  # the app saves it just after recording the round
            state: dict[str, torch.Tensor] = {}
            none = torch.zeros(0, dtype=torch.long)
            devices = Devices(torch.zeros(0), torch.zeros(0, dtype=torch.bool), none, none, none, none.bool(), none)
            if record.round in evaluate_at:
                snapshot = torch.load(saved, weights_only=True)
                state = snapshot["state"]
                devices = Devices(users=snapshot["users"], started=snapshot["started"], joined=none, counted=none,
                                  evaluated=none, exhausted=none.bool(), count_pass=none)
                saved.unlink()
            evaluate(record, state, _constant(devices))
            done += 1
        if ended:
            return
        time.sleep(POLL_SECONDS)


def _constant(devices: Devices) -> Callable[[], Devices]:
    return lambda: devices
