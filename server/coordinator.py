"""The coordinator's round loop, written once for every host: sample, sign, collect, check, add
device-level noise, take the server step, account, checkpoint.

A ``Transport`` carries a round to the sampled devices and brings back the sum of what they
contributed: Flower's Message API (``attune.server.transport``), Flower's SecAgg+ workflow
(``attune.server.secure_aggregation``), or the in-process simulation backend
(``attune.simulations.fast``). ``app.py`` is the ServerApp shell.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import torch

from attune.server.aggregation import ServerOptimizer, device_level_noise, server_optimizer
from attune.server.checkpoint import Checkpoint, latest_checkpoint, prune_checkpoints, save_checkpoint
from attune.server.config import ServerConfig
from attune.server.planning import Plan, plan
from attune.shared import evaluation
from attune.shared.accounting import Entry, epsilon_of
from attune.shared.config import PrivacyMode
from attune.shared.errors import StoreError
from attune.shared.mechanism import dequantize, device_bound, planned_entries, share_std, units
from attune.shared.model import ModelConfig, shared_model
from attune.shared.randomness import Stream, bernoulli
from attune.shared.selection import count_slices, select
from attune.shared.wire import RoundRequest

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """What came back from one round's cohort."""

    total: torch.Tensor | None  # the combined contributions (long units when private), if any
    contributors: list[int]  # devices whose contributions are in ``total``
    refused: int = 0  # devices that declined (consent, pause, budget, replay, their own limits)
    rejected: int = 0  # contributions that failed the checks
    failed: int = 0  # errors and devices that did not answer
    aborted: str = ""  # why no sum was released (distributed: too few survivors)
    rejections: list[str] = field(default_factory=list)


class Transport(Protocol):
    """Carries rounds to devices. ``collect`` returns only what the privacy mode allows the
    coordinator to see (a secure sum under SecAgg+)."""

    def devices(self) -> list[int]: ...

    def collect(self, request: RoundRequest, cohort: list[int], min_survivors: int) -> Collected: ...


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round, as the coordinator saw it."""

    round: int
    sampled: int
    contributed: int
    refused: int
    rejected: int
    failed: int
    aborted: str
    epsilon: float  # event-level, of the device that joined most rounds (planned entries)
    device_level_epsilon: float | None
    rejections: tuple[str, ...] = ()
    task: str = "train"  # train, count or evaluate
    evaluation: dict[str, float] | None = None  # an evaluation round's estimate (attune.shared.evaluation)


RoundCallback = Callable[[RoundRecord, dict[str, torch.Tensor]], None]


def initial_state(config: ServerConfig) -> dict[str, torch.Tensor]:
    return shared_model(config.model).init_state(torch.Generator().manual_seed(config.seed))


def _stream(config: ServerConfig, *labels: int | str) -> Stream:
    """The coordinator's randomness: seeded only in simulations (``noise_seed``)."""
    if config.noise_seed is None:
        return Stream.secure()
    return Stream.seeded_from(config.noise_seed, "coordinator", *labels)


def sample(devices: list[int], rate: float, stream: Stream) -> list[int]:
    """Poisson sampling: every device independently with probability ``rate`` (all at rate 1)."""
    if rate >= 1:
        return list(devices)
    chosen = bernoulli(stream, len(devices), rate)
    return [device for device, keep in zip(devices, chosen.tolist(), strict=True) if keep]


@dataclass
class RunState:
    """Everything a checkpoint restores."""

    run_id: str
    round: int
    params: torch.Tensor  # flattened float64
    buffers: dict[str, torch.Tensor]  # the model's untrained buffers (which items have rows)
    optimizer: ServerOptimizer
    plan: Plan
    device_level: list[Entry]
    participation: Counter  # device id -> training rounds its contribution was in a released sum
    counted: bool = False  # the count rounds released their sums (or the model has none)
    counts: Counter = field(default_factory=Counter)  # device id -> count passes it was in a released sum
    # A count pass under way (not checkpointed: a resumed run starts the pass again, paid again):
    # the released sums of its slices so far, and the cohort every slice asks.
    count_sums: list[torch.Tensor] = field(default_factory=list)
    count_cohort: list[int] = field(default_factory=list)
    evaluated: Counter = field(default_factory=Counter)  # device id -> evaluation rounds in a released sum


def _resume(config: ServerConfig, fresh: RunState) -> RunState:
    assert config.out_dir is not None
    found = latest_checkpoint(config.out_dir / "checkpoints")
    if found is None:
        raise StoreError(f"resume=true but no checkpoint in {config.out_dir / 'checkpoints'} verifies: "
                         "refusing to restart from round 1 with an empty ledger")
    layout = shared_model(config.model).layout
    if found.params is None or tuple(found.params.shape) != (layout.size,) or found.plan is None:
        size = 0 if found.params is None else found.params.numel()
        raise StoreError(f"the checkpoint of round {found.round} in {config.out_dir / 'checkpoints'} was written for "
                         f"another model ({size} parameters, this one has {layout.size}): resume with the run's "
                         "own model settings, or start a new run in another out-dir")
    fresh.optimizer.load_state_dict(found.optimizer)
    return RunState(run_id=found.run_id, round=found.round, params=found.params,
                    buffers={p.name: found.state[p.name] for p in layout.buffers}, optimizer=fresh.optimizer,
                    plan=found.plan, device_level=found.device_level, participation=Counter(found.participation),
                    counted=found.counted, counts=Counter(found.counts), evaluated=Counter(found.evaluated))


def run(transport: Transport, config: ServerConfig, on_round: RoundCallback | None = None,
        population: int | None = None) -> list[RoundRecord]:
    """Run rounds up to ``config.rounds`` (from the last checkpoint when resuming)."""
    devices = _wait_for_devices(transport, config.min_devices)
    run_plan = plan(config, population or len(devices))
    layout, start = shared_model(config.model).layout, initial_state(config)
    state = RunState(run_id=secrets.token_hex(8), round=0, params=layout.flatten(start),
                     buffers={p.name: start[p.name] for p in layout.buffers},
                     optimizer=server_optimizer(config.server_optimizer, run_plan.server_lr), plan=run_plan,
                     device_level=[], participation=Counter(), counted=run_plan.count is None)
    if config.resume:
        state = _resume(config, state)
        log.info("resuming run %s after round %d", state.run_id, state.round)
    run_plan = state.plan
    log.info("devices: %d; noise multiplier %.4f (user vector %.4f); device-level %.4f; planned rounds "
             "per device %d", run_plan.population, run_plan.round.noise_multiplier,
             run_plan.round.user_noise_multiplier, run_plan.device_level_noise, run_plan.participations)
    history: list[RoundRecord] = []
    for server_round in range(state.round + 1, run_plan.server_rounds(config.rounds) + 1):
        evaluating = server_round in run_plan.evaluation_rounds  # every device is asked
        cohort = sample(transport.devices(), 1.0 if evaluating else run_plan.sample_rate,
                        _stream(config, "sample", server_round))
        if not evaluating and state.count_sums:  # a count pass asks every slice of the devices of its first
            cohort = state.count_cohort
        if run_plan.device_level_noise > 0 and config.device_level_epsilon is not None:
            after = epsilon_of([*state.device_level, run_plan.device_level_entry(evaluating)],
                               config.device_level_delta)
            if after > config.device_level_epsilon * (1 + 1e-9):
                log.warning("stopping: the next round would bring device-level epsilon to %.3f, over %.3f",
                            after, config.device_level_epsilon)
                break
        record = _round(transport, config, state, cohort, server_round)
        history.append(record)
        log.info("round %d (%s): cohort %d, contributed %d, declined %d, rejected %d, failed %d%s; epsilon %.3f",
                 record.round, record.task, record.sampled, record.contributed, record.refused, record.rejected,
                 record.failed, f"; aborted: {record.aborted}" if record.aborted else "", record.epsilon)
        if config.out_dir is not None:
            save_checkpoint(config.out_dir / "checkpoints", Checkpoint(
                round=server_round, state=_state_dict(state, config), optimizer=state.optimizer.state_dict(),
                run_id=state.run_id, plan=run_plan, device_level=state.device_level,
                participation=dict(state.participation), params=state.params, counted=state.counted,
                counts=dict(state.counts), evaluated=dict(state.evaluated)))
            prune_checkpoints(config.out_dir / "checkpoints", config.keep_checkpoints)
            with (config.out_dir / "rounds.jsonl").open("a") as handle:
                handle.write(json.dumps(asdict(record)) + "\n")
        if on_round is not None:
            on_round(record, _state_dict(state, config))
    return history


def _state_dict(state: RunState, config: ServerConfig) -> dict[str, torch.Tensor]:
    layout = shared_model(config.model).layout
    params = {name: value.float().clone() for name, value in layout.unflatten(state.params).items()}
    return params | {name: value.clone() for name, value in state.buffers.items()}


def _round(transport: Transport, config: ServerConfig, state: RunState, cohort: list[int],
           server_round: int) -> RoundRecord:
    run_plan = state.plan
    evaluating = server_round in run_plan.evaluation_rounds
    guarantee = 0.0
    if run_plan.device_level_noise > 0:  # what the released model will guarantee after this round
        guarantee = epsilon_of([*state.device_level, run_plan.device_level_entry(evaluating)],
                               config.device_level_delta)
    counting = not state.counted and not evaluating  # until a count pass released its sums, rounds count the items
    round_config = run_plan.round
    if counting and run_plan.count is not None:
        round_config = replace(run_plan.count, count_part=len(state.count_sums))
    if evaluating:
        assert run_plan.evaluation is not None
        round_config = run_plan.evaluation
    request = RoundRequest(run_id=state.run_id, round=server_round, model=config.model, config=round_config,
                           state=_state_dict(state, config), device_level_epsilon=guarantee,
                           device_level_delta=config.device_level_delta if guarantee else 0.0)
    survivors = round_config.min_survivors if round_config.privacy is PrivacyMode.DISTRIBUTED else 1
    collected = transport.collect(request, cohort, survivors) if cohort else Collected(None, [])
    if collected.total is not None and len(collected.contributors) < survivors:  # never release it
        collected = Collected(None, [], collected.refused, collected.rejected, collected.failed,
                              f"{len(collected.contributors)} survivors, fewer than {survivors}", collected.rejections)
    estimate = None
    if collected.total is not None:
        gradient = dequantize(collected.total, round_config) if round_config.private else collected.total.double()
        bound = device_bound(round_config) / units(round_config) if round_config.private \
            else round_config.device_norm * round_config.clip
        gradient = device_level_noise(gradient, bound, run_plan.device_level_noise,
                                      _stream(config, "device-level", server_round))
        if evaluating:
            std = math.hypot(share_std(round_config) * math.sqrt(len(collected.contributors)) / units(round_config),
                             run_plan.device_level_noise * bound)
            clip = round_config.clip
            estimate = evaluation.estimate(evaluation.in_events(gradient, clip),
                                           float(evaluation.in_events(torch.tensor(std), clip)),
                                           len(collected.contributors))
            state.evaluated.update(collected.contributors)
            log.info("evaluation round %d: HR@10 %.4f ± %.4f (popular list %.4f ± %.4f) over %d devices, %.0f "
                     "events (noised)", server_round, estimate.hr, estimate.hr_half_width, estimate.popular_hr,
                     estimate.popular_hr_half_width, estimate.devices, estimate.events)
        elif counting:
            if round_config.count_part == 0:  # devices pay for a pass at its first slice
                state.count_sums, state.count_cohort = [], cohort
                state.counts.update(collected.contributors)
            state.count_sums.append(gradient / (round_config.clip * run_plan.sample_rate))
            if len(state.count_sums) == count_slices(config.model.num_items):
                _select(state, config, torch.cat(state.count_sums))
                state.count_sums = []
        else:
            state.params = state.optimizer.step(state.params, gradient / run_plan.expected_cohort)
            state.participation.update(collected.contributors)
    elif counting:  # a slice not released: the pass starts again (its devices pay again)
        state.count_sums = []
    if run_plan.device_level_noise > 0:  # an empty or aborted round shows that it released nothing: charged too
        state.device_level.append(run_plan.device_level_entry(evaluating))
    state.round = server_round
    return RoundRecord(
        round=server_round, sampled=len(cohort), contributed=len(collected.contributors),
        refused=collected.refused, rejected=collected.rejected, failed=collected.failed,
        aborted=collected.aborted,
        epsilon=most_spent(config.model, run_plan, Joined(state.participation, state.counts, state.evaluated),
                           config.delta)[0],
        device_level_epsilon=epsilon_of(state.device_level, config.device_level_delta)
        if run_plan.device_level_noise > 0 else None,
        rejections=tuple(collected.rejections[:20]), task=round_config.task.value,
        evaluation=None if estimate is None else estimate.as_dict())


@dataclass(frozen=True)
class Joined:
    """Per device, the rounds of each kind its contribution was in a released sum."""

    training: Mapping[int, int]
    counts: Mapping[int, int]
    evaluations: Mapping[int, int] = field(default_factory=dict)

    def kinds(self) -> set[tuple[int, int, int]]:
        """The distinct (training, count, evaluation) triples among the devices."""
        devices = {*self.training, *self.counts, *self.evaluations}
        return {(self.training.get(d, 0), self.counts.get(d, 0), self.evaluations.get(d, 0)) for d in devices} \
            or {(0, 0, 0)}


def spent(model: ModelConfig, run_plan: Plan, training: int, counts: int, evaluations: int, *,
          local: bool = False) -> list[Entry]:
    """The planned ledger of a device that joined that many rounds of each kind."""
    return planned_entries(model, run_plan.round, training, local=local, count=run_plan.count, counts=counts,
                           evaluation=run_plan.evaluation, evaluations=evaluations)


def most_spent(model: ModelConfig, run_plan: Plan, joined: Joined, delta: float) -> tuple[float, int, int, int]:
    """Epsilon of the device that spent most, and its training, count and evaluation rounds (each
    distinct triple is accounted once)."""
    kinds = sorted(joined.kinds())
    epsilons = [epsilon_of(spent(model, run_plan, *kind), delta) for kind in kinds]
    top = max(range(len(epsilons)), key=epsilons.__getitem__)
    return epsilons[top], *kinds[top]


def _select(state: RunState, config: ServerConfig, counts: torch.Tensor) -> None:
    """Post-processing of a released count: which items get rows, every item's prior, and the first
    bias of each row (``attune.shared.selection``)."""
    model = shared_model(config.model)
    chosen = select(counts, config.model.rows, min_count=config.min_item_count,
                    negatives=state.plan.round.negatives)
    adopted = model.adopt(_state_dict(state, config), chosen)
    state.params = model.layout.flatten(adopted)
    state.buffers = {p.name: adopted[p.name] for p in model.layout.buffers}
    state.counted = True
    log.info("count rounds: %d of %d items get a trained row (noisy count >= %g)",
             int((chosen.row_items >= 0).sum()), config.model.num_items, config.min_item_count)


def _wait_for_devices(transport: Transport, minimum: int) -> list[int]:
    while len(devices := transport.devices()) < minimum:
        log.info("waiting for devices: %d connected, %d needed", len(devices), minimum)
        time.sleep(1)
    return devices
