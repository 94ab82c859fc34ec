"""What the coordinator asks of devices for a whole run: cohort size, the rounds a device is planned
to join, the minimum number of survivors, and the noise that makes the plan meet its epsilon.

Used by the coordinator loop and by simulations, so both plan exactly alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from attune.server.config import DEFAULT_MIN_SURVIVOR_FRACTION, DEFAULT_USER_REFRESHES, ServerConfig
from attune.shared.accounting import Entry, Gaussian, binomial_pmf, calibrate
from attune.shared.config import PrivacyMode, RoundConfig, RoundTask, preset
from attune.shared.errors import ConfigError
from attune.shared.mechanism import Side, calibrated
from attune.shared.model import shared_model
from attune.shared.selection import count_slices


@dataclass(frozen=True)
class Plan:
    """A run's plan: everything derived from the settings and the connected population. ``round``
    is sent to every device every round (signed)."""

    round: RoundConfig
    count: RoundConfig | None  # the count rounds that select the trained items (the first), if the model has them
    population: int  # devices connected at the start
    expected_cohort: float  # devices per round in expectation (the sum's divisor)
    sample_rate: float  # each device's chance to be sampled in a round
    participations: int  # rounds a device is planned to join (its noise is planned for these)
    device_level_noise: float  # DP-FedAvg noise multiplier on the sum (0: off)
    server_lr: float
    target_epsilon: float | None  # what the noise was calibrated to (None: the noise was given)
    evaluation: RoundConfig | None = None  # the evaluation rounds' config (every device is asked)
    evaluation_rounds: tuple[int, ...] = ()  # the server rounds that evaluate (after training rounds)

    def server_rounds(self, training: int) -> int:
        """The run's rounds in all: ``training`` ones and the evaluation rounds after them."""
        return training + len(self.evaluation_rounds)

    def device_level_entry(self, every_device: bool = False) -> Entry:
        """One round of device-level DP: a Poisson-sampled Gaussian on the sum (one device zeroed
        out, sensitivity ``device_norm * clip``), which also shows whether it released: its
        ``pivot`` is the chance that exactly one device fewer than the round needs was sampled
        besides this one (``docs/privacy.md``). An evaluation round asks ``every_device``."""
        if every_device or self.sample_rate >= 1:
            return Entry(Gaussian(self.device_level_noise))
        needed = self.round.min_survivors if self.round.privacy is PrivacyMode.DISTRIBUTED else 1
        return Entry(Gaussian(self.device_level_noise, q=self.sample_rate,
                              pivot=binomial_pmf(needed - 1, self.population - 1, self.sample_rate)))


def planned_participations(rounds: int, rate: float) -> int:
    """Rounds a device joins when sampled with probability ``rate`` each round: all of them at
    rate 1, else the mean plus one standard deviation (a device sampled more often than planned
    refuses the rounds its budget cannot pay for: about one device in six, late in the run)."""
    if rate >= 1:
        return rounds
    mean = rounds * rate
    return min(rounds, math.ceil(mean + math.sqrt(mean * (1 - rate))))


def lowest_cohort(cohort: int, rate: float) -> float:
    """The cohort a round can count on: all of it when every device is asked, else three standard
    deviations under the Poisson-sampled mean (a round falls under it about once in 700), so that
    sampling alone does not abort rounds."""
    return cohort if rate >= 1 else max(0.0, cohort - 3 * math.sqrt(cohort * (1 - rate)))


def evaluation_rounds(rounds: int, every: int) -> tuple[int, ...]:
    """The server rounds that evaluate: one after every ``every`` training rounds (``0``: none but
    the last) and one after the last, numbered among the training rounds they follow."""
    after = sorted({t for t in range(1, rounds + 1) if every and t % every == 0} | {rounds})
    return tuple(t + k + 1 for k, t in enumerate(after))


def planned_evaluations(config: ServerConfig) -> tuple[int, ...]:
    """The run's evaluation rounds: with a share of a private mode's budget only."""
    if config.eval_share > 0 and config.mode is not PrivacyMode.OFF:
        return evaluation_rounds(config.rounds, config.eval_every)
    return ()


def plan(config: ServerConfig, population: int) -> Plan:
    """The plan for ``population`` connected devices: the mode's preset for every round knob not
    given, then what the settings leave to derive (never over a given value): the refresh
    schedule, the survivors, and the noise calibrated to the target epsilon."""
    if population < 1:
        raise ConfigError("no device is connected")
    if config.devices_per_round > population:
        raise ConfigError(f"devices_per_round is {config.devices_per_round} but only {population} devices are "
                          "connected")
    cohort = config.devices_per_round or population
    rate = cohort / population
    counting = shared_model(config.model).counts_items
    slices = count_slices(config.model.num_items) if counting else 0
    if counting and config.rounds < slices + 1:
        raise ConfigError(f"a model with trained_items needs at least {slices + 1} rounds: "
                          f"{'round 1 counts' if slices == 1 else f'the first {slices} count'} the items")
    participations = planned_participations(config.rounds - slices, rate)
    mode, given = config.mode, config.round.given()
    values = {**asdict(preset(mode)), **given}
    if mode is not PrivacyMode.OFF and "user_every" not in given:  # user_refreshes refreshes over its rounds
        refreshes = config.user_refreshes or DEFAULT_USER_REFRESHES
        values["user_every"] = max(1, round(participations / refreshes))
    if mode is PrivacyMode.DISTRIBUTED:
        if "min_survivors" not in given:
            fraction = config.min_survivor_fraction or DEFAULT_MIN_SURVIVOR_FRACTION
            values["min_survivors"] = max(2, math.ceil(fraction * lowest_cohort(cohort, rate)))
        if values["min_survivors"] > cohort:
            raise ConfigError(f"distributed mode needs min_survivors={values['min_survivors']} devices in every round, "
                              f"the plan has {cohort} per round")
        if values["min_survivors"] < 2:
            raise ConfigError("distributed mode needs min_survivors >= 2: one share alone is not the noise")
    round_config = RoundConfig(**values)
    count = replace(round_config, task=RoundTask.COUNT) if counting else None
    evaluating = planned_evaluations(config)
    evaluation = replace(round_config, task=RoundTask.EVALUATE) if evaluating else None
    noise_given = bool({"noise_multiplier", "user_noise_multiplier"} & set(given))
    target = config.target_epsilon
    if target is None and not noise_given:
        target = config.preset.target_epsilon
    if target is not None:
        round_config, count, evaluation = calibrated(
            config.model, round_config, epsilon=target, delta=config.delta, participations=participations,
            user_share=config.user_share, count=None if count is None else Side(count, 1, config.count_share),
            evaluation=None if evaluation is None else Side(evaluation, len(evaluating), config.eval_share))
    noise = config.device_level_noise or 0.0
    if config.device_level_epsilon is not None:
        noise = calibrate(lambda z: [Entry(Gaussian(z, q=rate), count=config.rounds),
                                     Entry(Gaussian(z), count=len(evaluating))],
                          config.device_level_epsilon, config.device_level_delta)
    return Plan(round=round_config, count=count, population=population, expected_cohort=float(cohort), sample_rate=rate,
                participations=participations, device_level_noise=noise,
                server_lr=config.server_lr if config.server_lr is not None else config.preset.server_lr,
                target_epsilon=target, evaluation=evaluation, evaluation_rounds=evaluating)
