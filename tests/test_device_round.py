"""The device round as one object: admit -> reserve -> train -> send, in that order, whatever runs
it; a phone and the in-process backend's simulated devices run the same one and stop alike."""

from dataclasses import dataclass, field

import pytest
import torch
from device_helpers import VOCAB, request

from attune.client.device_round import DeviceRound, Standing, Status
from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.client.store import Reservation
from attune.client.training import Cohort
from attune.shared.accounting import epsilon_of
from attune.shared.config import RoundTask
from attune.shared.errors import ConfigError
from attune.shared.events import Event
from attune.shared.mechanism import planned_entries
from attune.shared.model import ModelConfig
from attune.simulations.fast import InProcessTransport

MODEL = ModelConfig(num_items=40, dim=4, use_context=False, trained_items=0)


@dataclass
class Recorder:
    """A device that records what the round asked of it."""

    standings: list[Standing]
    paid: bool = True
    model_config: ModelConfig = MODEL
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    calls: list[str] = field(default_factory=list)

    def standing(self) -> Standing:
        self.calls.append("standing")
        return self.standings.pop(0) if len(self.standings) > 1 else self.standings[0]

    def reserve(self, request, refresh) -> Reservation:
        self.calls.append(f"reserve refresh={refresh}")
        return Reservation(row=1) if self.paid else Reservation(None, "over budget", over_budget=True)

    def stop_contributing(self) -> None:
        self.calls.append("stop")

    def train(self, request, refresh) -> torch.Tensor:
        self.calls.append(f"train refresh={refresh}")
        return torch.arange(6)

    def sent(self, nbytes: int) -> None:
        self.calls.append(f"sent {nbytes}")


def _standing(consented=True, paused=False, exhausted=False, joined=0) -> Standing:
    return Standing(consented=consented, paused=paused, budget_exhausted=exhausted, rounds_joined=joined)


def test_a_round_admits_then_pays_then_trains_then_sends():
    device = Recorder([_standing(joined=10)])  # user_every 10: the 11th training round refreshes
    device_round = DeviceRound(device, request(model=MODEL, user_every=10))
    vector = device_round.send(device_round.run())
    assert torch.equal(vector, torch.arange(6))
    assert device.calls == ["standing", "reserve refresh=True", "train refresh=True", "standing", "sent 48"]
    between = Recorder([_standing(joined=13)])
    DeviceRound(between, request(model=MODEL, user_every=10)).run()
    counting = Recorder([_standing(joined=10)])
    DeviceRound(counting, request(model=MODEL, user_every=10, task=RoundTask.COUNT)).run()
    assert between.calls[1] == counting.calls[1] == "reserve refresh=False"  # a count round refreshes nothing


@pytest.mark.parametrize("standing, reason", [(_standing(consented=False), "consent"),
                                              (_standing(paused=True), "paused"),
                                              (_standing(exhausted=True), "budget exhausted")])
def test_a_declined_round_never_reaches_the_ledger(standing, reason):
    device = Recorder([standing])
    outcome = DeviceRound(device, request(model=MODEL)).run()
    assert outcome.status is Status.REFUSED and reason in outcome.reason and device.calls == ["standing"]
    other = Recorder([_standing()], model_config=ModelConfig(num_items=41, dim=4))
    assert "model" in DeviceRound(other, request(model=MODEL)).run().reason and other.calls == ["standing"]
    with pytest.raises(ConfigError):
        DeviceRound(device, {"round": 1})  # type: ignore[arg-type]


def test_a_budget_that_cannot_pay_stops_the_device_and_nothing_is_trained():
    device = Recorder([_standing()], paid=False)
    outcome = DeviceRound(device, request(model=MODEL)).run()
    assert outcome.status is Status.REFUSED and device.calls == ["standing", "reserve refresh=True", "stop"]
    assert DeviceRound(device, request(model=MODEL)).send(outcome) is None


def test_consent_withdrawn_during_the_round_withholds_the_vector():
    device = Recorder([_standing(), _standing(consented=False)])
    device_round = DeviceRound(device, request(model=MODEL))
    outcome = device_round.run()
    assert outcome.status is Status.CONTRIBUTED
    assert device_round.send(outcome) is None and not any(call.startswith("sent") for call in device.calls)


def test_simulated_devices_and_a_phone_stop_alike_once_their_budget_cannot_pay(tmp_path):
    """Both run ``DeviceRound``: two training rounds are paid, the third is not and stops the
    device, so a nearly free count round after it is refused too (its cost alone fits)."""
    def train(number):
        return request(number, model=MODEL)

    count = request(4, model=MODEL, task=RoundTask.COUNT, noise_multiplier=50.0)
    config = train(1).config
    budget = 1.01 * epsilon_of(planned_entries(MODEL, config, 2), 1e-5)
    assert epsilon_of(planned_entries(MODEL, config, 2, count=count.config), 1e-5) < budget < \
        epsilon_of(planned_entries(MODEL, config, 3), 1e-5)
    privacy = PrivacyConfig(epsilon_budget=budget)
    phone = Personalizer(tmp_path / "phone.sqlite", model=MODEL, vocabulary=VOCAB, privacy=privacy,
                         simulation_seed=(0, 0))
    phone.grant_consent("test-policy-1")
    phone.record_many(Event(f"item{i % 12}", "click", 1.7e9 + i) for i in range(30))
    transport = InProcessTransport(Cohort.of([phone.local_data()]), 0, privacy, noise="per-device")
    outcomes = []
    for round_request in (train(1), train(2), train(3), count):
        on_phone = phone.contribute(round_request).status is Status.CONTRIBUTED
        simulated = transport.collect(round_request, transport.devices(), 1).contributors == [0]
        outcomes.append((on_phone, simulated))
    assert outcomes == [(True, True), (True, True), (False, False), (False, False)]
    assert phone.state.budget_exhausted and bool(transport.devices_state.exhausted[0])
