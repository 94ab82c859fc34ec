"""In-process simulation backend: the coordinator loop of ``attune.server.coordinator`` with a
transport that runs every sampled device's round in this process, in batched blocks.

Each simulated device holds what a phone would: its events (flat tensors, ``Cohort``), its DP
user vector and the number of rounds it joined (its ledger is that many planned rounds). Its
round is the ClientApp's ``attune.client.device_round.DeviceRound`` (admit, reserve, train,
send), run once for all devices alike in their standing; its train step is
``attune.client.training.train_round``, with a stream seeded from the run's seed, the device and
the round, so the Flower backend computes the same numbers. The sum of the contributions is
computed directly instead of through SecAgg+ (``secure_aggregation: "simulated"`` in
``results.json``); with ``noise="aggregate"`` the simulator also draws the honest shares' total
noise as one discrete Gaussian of their summed variance (same accounting; it skips
``devices x dim`` draws per round).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from attune.client.device_round import DeviceRound, Standing
from attune.client.policy import PrivacyConfig
from attune.client.store import Reservation
from attune.client.training import Cohort, evaluation_contributions, initial_user_vector, train_round
from attune.server.coordinator import Collected, Joined
from attune.shared.accounting import epsilon_of
from attune.shared.config import RoundConfig, RoundTask
from attune.shared.errors import ConfigError
from attune.shared.evaluation import STATISTICS
from attune.shared.events import EVENT_TYPES, EVENT_WEIGHTS, context_matrix, nearest_event_types
from attune.shared.mechanism import planned_entries, share_std
from attune.shared.model import ModelConfig
from attune.shared.randomness import Stream, bernoulli, device_stream, discrete_gaussian
from attune.shared.wire import RoundRequest
from attune.simulations.datasets import EventLog
from attune.simulations.evaluation import Split, hours_weekdays

BLOCK = 256  # devices computed together
NOISE = ("per-device", "aggregate")
_TYPE_WEIGHTS = torch.tensor([EVENT_WEIGHTS[t] for t in EVENT_TYPES])


def device_cohort(log: EventLog, split: Split, use_context: bool) -> Cohort:
    """Every user's training events as its device builds them from its store (store order)."""
    everything = np.lexsort((np.arange(len(log)), log.timestamps, log.users))
    kept = everything[split.train[everything]]
    order = torch.from_numpy(kept)
    kinds = nearest_event_types(torch.from_numpy(log.weights)[order])  # as simulations.devices stores them
    context = None
    if use_context:
        hours, days = hours_weekdays(log.timestamps[kept])
        context = context_matrix(hours, days, kinds)
    bounds = np.searchsorted(log.users[kept], np.arange(log.num_users + 1))
    return Cohort(items=torch.from_numpy(log.items)[order], weights=_TYPE_WEIGHTS[kinds],
                  context=context, offsets=torch.from_numpy(bounds.astype(np.int64)))


@dataclass
class Devices:
    """Every simulated device's state: its DP user vector (``None`` before its first round), the
    rounds it joined and whether its budget stopped it. One training and one count config per
    run, so its ledger is ``counted`` count rounds and ``joined`` training rounds as planned."""

    users: torch.Tensor  # [devices, dim]
    started: torch.Tensor  # bool [devices]
    joined: torch.Tensor  # long [devices]: training rounds
    counted: torch.Tensor  # long [devices]: count rounds
    evaluated: torch.Tensor  # long [devices]: evaluation rounds
    exhausted: torch.Tensor  # bool [devices]: a round its budget could not pay was refused
    count_pass: torch.Tensor  # long [devices]: the round of the first count slice it paid (-1: none)

    def joined_rounds(self) -> Joined:
        return Joined(*(dict(enumerate(t.tolist())) for t in (self.joined, self.counted, self.evaluated)))


# The statistics (``attune.shared.evaluation``) of each device's evaluated events under a global
# state: ``[devices, 5]``, one evaluated event per device (the simulator's held-out one).
Evaluator = Callable[[dict[str, torch.Tensor], Devices], torch.Tensor]


class InProcessTransport:
    """A ``Transport`` whose devices live in this process. ``privacy``: every device's own limits
    (``attune.client.policy``: it refuses what a phone would); ``availability``: the chance that
    a sampled device is online."""

    def __init__(self, cohort: Cohort, seed: int, privacy: PrivacyConfig, *, availability: float = 1.0,
                 noise: str = "aggregate", evaluator: Evaluator | None = None) -> None:
        if noise not in NOISE:
            raise ConfigError(f"noise must be one of {', '.join(NOISE)}, got {noise!r}")
        self.cohort, self.seed, self.privacy = cohort, seed, privacy
        self.availability, self.noise = availability, noise
        self.devices_state: Devices | None = None
        self.count_config: RoundConfig | None = None  # the run's count round, once seen
        self.pass_round = -1  # the round of the current count pass's first slice
        self.training_config: RoundConfig | None = None  # and its training rounds
        self.evaluation_config: RoundConfig | None = None  # and its evaluation rounds
        self.evaluator = evaluator
        self._stats = torch.zeros(0, len(STATISTICS))

    def devices(self) -> list[int]:
        return list(range(len(self.cohort)))

    def _state(self, dim: int) -> Devices:
        if self.devices_state is None:
            count = len(self.cohort)
            joined, counted, evaluated = (torch.zeros(count, dtype=torch.long) for _ in range(3))
            self.devices_state = Devices(torch.zeros(count, dim), torch.zeros(count, dtype=torch.bool), joined,
                                         counted, evaluated, torch.zeros(count, dtype=torch.bool),
                                         torch.full((count,), -1, dtype=torch.long))
        return self.devices_state

    def spent(self, request: RoundRequest, joined: int, counted: int, evaluated: int) -> float:
        """What a device that joined that many training, count and evaluation rounds has spent."""
        training = self.training_config or request.config  # before any training round: joined is 0
        return epsilon_of(planned_entries(request.model, training, joined, count=self.count_config,
                                          counts=counted, evaluation=self.evaluation_config, evaluations=evaluated),
                          self.privacy.delta)

    def collect(self, request: RoundRequest, cohort: list[int], min_survivors: int) -> Collected:
        state = self._state(request.model.dim)
        online = cohort
        if self.availability < 1:
            flags = bernoulli(Stream.seeded_from(self.seed, "availability", request.round), len(cohort),
                              self.availability)
            online = [d for d, up in zip(cohort, flags.tolist(), strict=True) if up]
        if request.config.task is RoundTask.COUNT and request.config.count_part == 0:
            self.count_config, self.pass_round = request.config, request.round
        if request.config.task is RoundTask.TRAIN:
            self.training_config = request.config
        if request.config.task is RoundTask.EVALUATE:
            if self.evaluator is None:
                raise ConfigError("an evaluation round needs the simulator's evaluator")
            self.evaluation_config = request.config
            self._stats = self.evaluator(request.state, state)  # every device's, computed once
        # Devices alike in what a round's admission and ledger read (the rounds they joined, a spent
        # budget, whether they paid the current count pass) run it as one ``DeviceRound``: the very
        # object a phone runs, in blocks.
        standings: dict[tuple[int, int, int, bool, bool], list[int]] = {}
        for device, joined, counted, evaluated, exhausted, paid in zip(
                online, state.joined[online].tolist(), state.counted[online].tolist(),
                state.evaluated[online].tolist(), state.exhausted[online].tolist(),
                (state.count_pass[online] == self.pass_round).tolist(), strict=True):
            standings.setdefault((joined, counted, evaluated, exhausted, paid), []).append(device)
        total, admitted = None, []
        for (joined, counted, evaluated, exhausted, paid), devices in standings.items():
            alike = _Alike(self, request.model, devices, joined, counted, evaluated, exhausted, paid)
            device_round = DeviceRound(alike, request)
            contribution = device_round.send(device_round.run())
            if contribution is not None:
                total = contribution if total is None else total + contribution
                admitted += devices
        position = {device: k for k, device in enumerate(online)}
        admitted.sort(key=position.__getitem__)
        if total is not None and self.noise == "aggregate" and request.config.private:
            shares = len(admitted)
            std = share_std(request.config) * math.sqrt(shares)
            total = total + discrete_gaussian([Stream.seeded_from(self.seed, "noise", request.round)],
                                              total.shape[0], std)[0]
        return Collected(total=total, contributors=admitted, refused=len(online) - len(admitted),
                         failed=len(cohort) - len(online))

    def admits(self, request: RoundRequest, joined: int, counted: int, evaluated: int) -> bool:
        """The device's budget check (``EventStore.reserve`` on a phone): would it stay within?"""
        if not request.config.private:
            return True
        task = request.config.task
        after = self.spent(request, joined + (task is RoundTask.TRAIN), counted + (task is RoundTask.COUNT),
                           evaluated + (task is RoundTask.EVALUATE))
        return after <= self.privacy.epsilon_budget * (1 + 1e-9)

    def run(self, request: RoundRequest, devices: list[int], refresh: bool) -> torch.Tensor:
        """The summed contribution of ``devices`` (admitted and paid, all refreshing their user
        vector or none), computed in blocks."""
        total = self._run_block(request, devices[:BLOCK], refresh)
        for first in range(BLOCK, len(devices), BLOCK):
            total = total + self._run_block(request, devices[first:first + BLOCK], refresh)
        return total

    def _run_block(self, request: RoundRequest, block: list[int], refresh: bool) -> torch.Tensor:
        state = self._state(request.model.dim)
        index = torch.tensor(block, dtype=torch.long)
        cohort = subset(self.cohort, block)
        streams = [device_stream(self.seed, device, request.round) for device in block]
        if request.config.task is RoundTask.EVALUATE:
            state.evaluated[index] += 1
            return evaluation_contributions(self._stats[index], torch.arange(len(block)), len(block), request.config,
                                            streams, shares=self.noise == "per-device").sum(dim=0)
        if request.config.task is RoundTask.COUNT:  # nothing trained: the users' vectors play no part
            if request.config.count_part == 0:  # a pass is paid for at its first slice
                state.counted[index] += 1
                state.count_pass[index] = request.round
            return train_round(request.state, request.model, state.users[index], cohort, request.config, streams,
                               [False] * len(block), shares=self.noise == "per-device").contributions.sum(dim=0)
        for device in block:  # a device's first round starts from a vector drawn on the device
            if not state.started[device]:
                state.users[device] = initial_user_vector(request.model.dim,
                                                          device_stream(self.seed, device, "user-init"))
                state.started[device] = True
        output = train_round(request.state, request.model, state.users[index], cohort, request.config, streams,
                             [refresh] * len(block), shares=self.noise == "per-device")
        state.users[index] = output.users.to(state.users.dtype)
        state.joined[index] += 1
        return output.contributions.sum(dim=0)


class _Alike:
    """Simulated devices alike in their standing, as one ``RoundDevice``: they admit, pay and
    train as each would alone, and send the sum of what each would send."""

    def __init__(self, transport: InProcessTransport, model: ModelConfig, devices: list[int], joined: int,
                 counted: int, evaluated: int, exhausted: bool, paid_pass: bool) -> None:
        self.transport, self.devices, self.rounds = transport, devices, (joined, counted, evaluated)
        self.model_config, self.privacy, self.exhausted = model, transport.privacy, exhausted
        self.paid_pass = paid_pass  # they paid the current count pass's first slice

    def standing(self) -> Standing:  # simulated people consent and never pause
        return Standing(consented=True, paused=False, budget_exhausted=self.exhausted, rounds_joined=self.rounds[0])

    def reserve(self, request: RoundRequest, refresh: bool) -> Reservation:
        if request.config.task is RoundTask.COUNT and request.config.count_part > 0:  # as slice_refusal
            return Reservation(row=sum(self.rounds) + 1) if self.paid_pass else \
                Reservation(row=None, reason="a count slice of a pass whose first slice they did not pay")
        if self.transport.admits(request, *self.rounds):
            return Reservation(row=sum(self.rounds) + 1)  # the row its planned ledger would write
        return Reservation(row=None, reason="the round would cross the privacy budget", over_budget=True)

    def stop_contributing(self) -> None:
        assert self.transport.devices_state is not None
        self.transport.devices_state.exhausted[self.devices] = True

    def train(self, request: RoundRequest, refresh: bool) -> torch.Tensor:
        return self.transport.run(request, self.devices, refresh)

    def sent(self, nbytes: int) -> None:
        """Simulated devices keep no report of what they sent."""


def subset(cohort: Cohort, devices: list[int]) -> Cohort:
    """The events of ``devices`` (in that order) as a cohort of their own."""
    starts, ends = cohort.offsets[devices], cohort.offsets[[d + 1 for d in devices]]
    rows = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]) \
        if devices else torch.zeros(0, dtype=torch.long)
    sizes = ends - starts
    return Cohort(cohort.items[rows], cohort.weights[rows],
                  cohort.context[rows] if cohort.context is not None else None,
                  torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]))
