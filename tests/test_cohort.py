"""The fast backend's batched cohort round computes what each device's own ``train_round`` does."""

from dataclasses import replace

import pytest
import torch

from attune.client.training import LocalData, train_round
from attune.shared.accounting import PrivacyLedger
from attune.shared.config import TrainConfig
from attune.shared.model import ModelConfig, Personalization
from attune.simulations.cohort import supported, train_cohort

CONFIG = ModelConfig(num_items=40, dim=4, use_context=False)


def _devices(count: int) -> list[LocalData]:
    g = torch.Generator().manual_seed(3)
    sizes = [1, 2, 7, 25, 60] + [int(n) for n in torch.randint(2, 50, (count - 5,), generator=g)]
    return [LocalData(items=torch.randint(0, 40, (n,), generator=g), weights=torch.rand(n, generator=g) + 0.5,
                      context=None) for n in sizes]


@pytest.mark.parametrize("train", [
    TrainConfig(local_epochs=4.0, user_epochs=1.0, sample_rate=1.0, lr=6.0, user_lr=3.0, negatives=1,
                noise_multiplier=4.5, max_grad_norm=1.0, joint_user=False),
    TrainConfig(local_epochs=1.0, user_epochs=0.6, sample_rate=0.3, lr=1.0, user_lr=0.5, negatives=3,
                noise_multiplier=0.8, max_grad_norm=0.3, joint_user=False, loss="bpr", update_clip=0.5),
    TrainConfig(local_epochs=2.0, user_epochs=1.0, sample_rate=0.5, lr=2.0, negatives=2, private=False,
                joint_user=False),
], ids=["defaults", "poisson-bpr-clipped", "non-private"])
def test_each_device_gets_exactly_its_own_train_round(train):
    assert supported(CONFIG, train)
    model = Personalization(CONFIG, torch.Generator().manual_seed(0))
    weights = model.global_state()
    datasets = _devices(12)
    starts = torch.randn(len(datasets), CONFIG.dim, generator=torch.Generator().manual_seed(1))
    results, vectors = train_cohort(weights, starts, datasets, train,
                                    [torch.Generator().manual_seed(100 + k) for k in range(len(datasets))])
    for k, data in enumerate(datasets):
        model.load_global_state(weights)
        with torch.no_grad():
            model.user_vector.weight.copy_(starts[k])
        own = train_round(model, data, train, PrivacyLedger(), torch.Generator().manual_seed(100 + k))
        for name, value in own.update.items():
            torch.testing.assert_close(results[k].update[name], value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vectors[k], model.user_vector.weight.detach()[0], rtol=1e-4, atol=1e-5)
        assert results[k].examples == own.examples and results[k].steps == own.steps
        assert results[k].mean_loss == pytest.approx(own.mean_loss, rel=1e-4, abs=1e-6)
        assert results[k].clipped_fraction == pytest.approx(own.clipped_fraction)


def test_setups_it_does_not_cover_are_left_to_train_round():
    train = TrainConfig(joint_user=False)
    assert not supported(replace(CONFIG, use_context=True), train)
    assert not supported(CONFIG, replace(train, joint_user=True))
    assert not supported(replace(CONFIG, num_items=100_000), train)  # lazy noise
