"""What the coordinator asks of devices for a whole run: cohort size, the rounds a device is planned
to join, the minimum number of survivors, and the noise that makes the plan meet its epsilon.

Used by the coordinator loop and by simulations, so both plan exactly alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from attune.server.config import ServerConfig
from attune.shared.accounting import Entry, calibrate, epsilon_of
from attune.shared.config import PrivacyMode, RoundConfig
from attune.shared.errors import ConfigError
from attune.shared.mechanism import calibrated, planned_entries


@dataclass(frozen=True)
class Plan:
    """A run's plan: ``round`` is sent to every device every round (signed)."""

    round: RoundConfig
    population: int  # devices connected at the start
    expected_cohort: float  # devices per round in expectation (the sum's divisor)
    sample_rate: float  # each device's chance to be sampled in a round
    participations: int  # rounds a device is planned to join (its noise is planned for these)
    device_level_noise: float  # DP-FedAvg noise multiplier on the sum (0: off)

    def device_level_entry(self) -> Entry:
        """One round of device-level DP: a Poisson-sampled Gaussian on the sum (add/remove one
        device, sensitivity ``device_norm * clip``)."""
        return Entry("gaussian", z=self.device_level_noise, q=self.sample_rate)


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


def plan(config: ServerConfig, population: int) -> Plan:
    """The plan for ``population`` connected devices."""
    if population < 1:
        raise ConfigError("no device is connected")
    if config.devices_per_round > population:
        raise ConfigError(f"devices_per_round is {config.devices_per_round} but only {population} devices are "
                          "connected")
    cohort = config.devices_per_round or population
    rate = cohort / population
    participations = planned_participations(config.rounds, rate)
    round_config = config.round
    if round_config.private:  # a device refreshes its user vector user_refreshes times over its rounds
        round_config = replace(round_config, user_every=max(1, round(participations / config.user_refreshes)))
    if round_config.privacy is PrivacyMode.DISTRIBUTED:
        survivors = max(2, math.ceil(config.min_survivor_fraction * lowest_cohort(cohort, rate)))
        if survivors > cohort:
            raise ConfigError(f"distributed mode needs at least 2 devices per round, the plan has {cohort}")
        round_config = replace(round_config, min_survivors=survivors,
                               colluders=min(round_config.colluders, survivors - 1))
    if config.target_epsilon is not None:
        round_config = calibrated(config.model, round_config, epsilon=config.target_epsilon, delta=config.delta,
                                  participations=participations, user_share=config.user_share)
    noise = config.device_level_noise
    if config.device_level_epsilon is not None:
        noise = calibrate(lambda z: [Entry("gaussian", count=config.rounds, z=z, q=rate)],
                          config.device_level_epsilon, config.device_level_delta)
    return Plan(round=round_config, population=population, expected_cohort=float(cohort), sample_rate=rate,
                participations=participations, device_level_noise=noise)


def planned_epsilon(plan_: Plan, config: ServerConfig) -> float:
    """Event-level epsilon of a device that joins every planned round."""
    return epsilon_of(planned_entries(config.model, plan_.round, plan_.participations), config.delta)
