"""Aggregation math against hand-computed values."""

import pytest
import torch

from attune.server.aggregation import ServerAdam, ServerSGD, combine, device_level_noise, server_optimizer
from attune.shared.errors import ConfigError
from attune.shared.randomness import Stream


def test_combine_sum_trimmed_mean_and_median_golden():
    rows = torch.tensor([[1.0, 10.0], [2.0, -4.0], [3.0, 0.0], [100.0, 2.0]])
    torch.testing.assert_close(combine(rows, "sum", 0.0), torch.tensor([106.0, 8.0]))
    # trim one of four from each end: mean of the middle two, times four
    torch.testing.assert_close(combine(rows, "trimmed-mean", 0.25), torch.tensor([10.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(combine(rows, "median", 0.0), torch.tensor([10.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(combine(rows[:3], "median", 0.0), torch.tensor([6.0, 0.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="unknown aggregation"):
        combine(rows, "mean", 0.0)


def test_one_hostile_row_cannot_move_a_robust_rule_far():
    honest = torch.ones(9, 3)
    hostile = torch.cat([honest, torch.full((1, 3), 1e9)])
    assert combine(hostile, "sum", 0.0).max() > 1e8
    torch.testing.assert_close(combine(hostile, "trimmed-mean", 0.1), torch.full((3,), 10.0, dtype=torch.float64))
    torch.testing.assert_close(combine(hostile, "median", 0.0), torch.full((3,), 10.0, dtype=torch.float64))


def test_server_adam_first_step_is_lr_times_sign():
    adam = ServerAdam(lr=0.5, beta1=0.9, beta2=0.99, eps=0.0)
    new = adam.step(torch.zeros(3), torch.tensor([2.0, -3.0, 0.5]))
    # m = 0.1 d, v = 0.01 d^2 -> m_hat / sqrt(v_hat) = sign(d): a step of lr against the gradient
    torch.testing.assert_close(new, torch.tensor([-0.5, 0.5, -0.5], dtype=torch.float64))


def test_server_adam_state_round_trip_continues_identically():
    gradients = [torch.randn(4, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    straight, params = ServerAdam(lr=0.1), torch.zeros(4)
    for gradient in gradients:
        params = straight.step(params, gradient)
    first, resumed = ServerAdam(lr=0.1), torch.zeros(4)
    for gradient in gradients[:2]:
        resumed = first.step(resumed, gradient)
    second = ServerAdam(lr=0.1)
    second.load_state_dict(first.state_dict())
    for gradient in gradients[2:]:
        resumed = second.step(resumed, gradient)
    torch.testing.assert_close(resumed, params)
    with pytest.raises(ConfigError, match="not sgd"):
        ServerSGD(1.0).load_state_dict(second.state_dict())


def test_server_optimizer_is_chosen_by_name():
    assert isinstance(server_optimizer("sgd", 2.0), ServerSGD)
    assert isinstance(server_optimizer("adam", 0.1), ServerAdam)
    torch.testing.assert_close(server_optimizer("sgd", 2.0).step(torch.ones(2), torch.ones(2)), -torch.ones(2))
    with pytest.raises(ConfigError, match="unknown server optimizer"):
        server_optimizer("momentum", 1.0)


def test_device_level_noise_has_the_configured_std():
    total = torch.zeros(200_000)
    noisy = device_level_noise(total, bound=2.0, noise_multiplier=1.5, stream=Stream.seeded_from(0, "t"))
    assert abs(noisy.std().item() - 3.0) < 0.03
    assert abs(noisy.mean().item()) < 0.03
    assert torch.equal(device_level_noise(total, 2.0, 0.0, Stream.seeded_from(0, "t")), total.double())
