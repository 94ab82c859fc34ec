"""Aggregation math against hand-computed values."""

import pytest
import torch

from attune.server.aggregation import ServerAdam, apply_update, weighted_mean


def test_weighted_mean_golden():
    updates = [({"a": torch.tensor([1.0, 2.0])}, 1.0), ({"a": torch.tensor([4.0, -1.0])}, 2.0)]
    mean = weighted_mean(updates)
    torch.testing.assert_close(mean["a"], torch.tensor([3.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        weighted_mean([])


def test_server_lr_scales_item_table_but_not_context_encoder():
    current = {"item_bias.weight": torch.zeros(2), "context_encoder.weight": torch.zeros(2)}
    mean = {"item_bias.weight": torch.ones(2).double(), "context_encoder.weight": torch.ones(2).double()}
    new = apply_update(current, mean, server_lr=10.0)
    torch.testing.assert_close(new["item_bias.weight"], torch.full((2,), 10.0))
    torch.testing.assert_close(new["context_encoder.weight"], torch.ones(2))


def test_server_adam_first_step_is_lr_times_sign():
    adam = ServerAdam(lr=0.5, beta1=0.9, beta2=0.99, eps=0.0)
    new = adam.step({"w": torch.zeros(3)}, {"w": torch.tensor([2.0, -3.0, 0.5]).double()})
    # m = 0.1 d, v = 0.01 d^2 -> m / sqrt(v) = sign(d)
    torch.testing.assert_close(new["w"], torch.tensor([0.5, -0.5, 0.5]))


def test_server_step_is_chosen_by_name():
    from attune.server.aggregation import ServerSGD, server_step

    assert isinstance(server_step("sgd", 2.0), ServerSGD)
    assert isinstance(server_step("adam", 0.1), ServerAdam)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        server_step("momentum", 1.0)
