"""Turn a behavior log into virtual devices: one event store per user.

The devices are real ``attune.client`` stores, so simulations exercise the same code as phones.
The held-out events stay with the simulator (``attune.simulations.evaluation``): devices never train
on them. For evaluation rounds the simulator records each device's held-out event on it just
before the round (``held_out``), as the person's app would, and deletes it after. Timestamps are
shifted so the newest event is an hour old
(the store rejects pre-2000 and future times and applies retention); hour and weekday are taken
from the original times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from attune.client.consent import write_consent
from attune.client.state import USER_KEY, decode_tensors
from attune.client.store import EventStore, Retention
from attune.shared.events import EVENT_TYPES, Event, EventContext, nearest_event_types
from attune.simulations.datasets import EventLog
from attune.simulations.evaluation import Split

# Simulated devices keep their whole history.
SIMULATION_RETENTION = Retention(max_events=1_000_000, max_age_days=36_500)
SIMULATED_POLICY = "simulation"


def store_path(directory: Path, user: int) -> Path:
    return directory / "devices" / f"device-{user:06d}.sqlite"


def held_out_path(directory: Path) -> Path:
    return directory / "held_out.json"


def held_out(directory: Path, user: int) -> Event:
    """The held-out event of ``user`` as ``write_devices`` wrote it."""
    item, kind, stamp, original = json.loads(held_out_path(directory).read_text())[user]
    return Event(item_id=item, event_type=kind, timestamp=stamp, context=EventContext.at(original))


def write_devices(log: EventLog, split: Split, directory: Path) -> Path:
    """Create one store per user with its training events, and the held-out events beside them;
    return the vocabulary file."""
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary_path = directory / "vocabulary.json"
    vocabulary_path.write_text(json.dumps(list(log.item_ids)))
    shift = time.time() - 3600 - float(log.timestamps.max())
    kinds = nearest_event_types(torch.from_numpy(log.weights)).tolist()
    order = np.argsort(log.users, kind="stable")
    bounds = np.searchsorted(log.users[order], np.arange(log.num_users + 1))
    for user in range(log.num_users):
        rows = order[bounds[user] : bounds[user + 1]]
        path = store_path(directory, user)
        path.unlink(missing_ok=True)
        events = [
            Event(item_id=log.item_ids[log.items[r]], event_type=EVENT_TYPES[kinds[r]],
                  timestamp=float(log.timestamps[r]) + shift, context=EventContext.at(float(log.timestamps[r])))
            for r in rows
            if split.train[r]
        ]
        with EventStore(path, SIMULATION_RETENTION) as store:
            store.add_many(events)
            write_consent(store, True, SIMULATED_POLICY)  # every simulated person opted in
    held: list[list | None] = [None] * log.num_users
    everything = np.lexsort((np.arange(len(log)), log.timestamps, log.users))
    for r in everything[~split.train[everything]]:  # per user the latest wins: the held-out one
        original = float(log.timestamps[r])
        held[int(log.users[r])] = [log.item_ids[log.items[r]], EVENT_TYPES[kinds[r]], original + shift, original]
    held_out_path(directory).write_text(json.dumps(held))
    return vocabulary_path


def read_user_vectors(directory: Path, users: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each simulated device's DP user vector (and whether it has one), read from its store."""
    vectors, started = torch.zeros(users, dim), torch.zeros(users, dtype=torch.bool)
    for user in range(users):
        with EventStore(store_path(directory, user), SIMULATION_RETENTION) as store:
            raw = store.get_state(USER_KEY)
        if raw is not None:
            vectors[user], started[user] = decode_tensors(raw)["user"], True
    return vectors, started


def read_ledgers(directory: Path, users: int) -> list[list]:
    """Each simulated device's ledger entries (what it spent), read from its store."""
    ledgers = []
    for user in range(users):
        with EventStore(store_path(directory, user), SIMULATION_RETENTION) as store:
            ledgers.append([row for row in store.ledger()])
    return ledgers
