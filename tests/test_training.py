"""The device round: one device alone computes what it computes in a cohort, the non-private
round is the plain gradient, and every contribution has the shape and type the wire expects."""

import pytest
import torch

from attune.client.training import (
    Cohort,
    LocalData,
    fit_rank_vectors,
    initial_user_vector,
    train_round,
)
from attune.shared.config import preset
from attune.shared.loss import Batch, per_example_loss
from attune.shared.mechanism import contribution_dim, device_bound
from attune.shared.model import EmbeddingNetwork, ModelConfig, shared_model
from attune.shared.randomness import Stream, integers

MODEL = ModelConfig(num_items=50, dim=4, use_context=True, trained_items=0)


def _devices(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [LocalData(torch.randint(0, 50, (n,), generator=g), torch.rand(n, generator=g) + 0.5,
                      torch.rand(n, MODEL.context_features, generator=g)) for n in sizes]


@pytest.mark.parametrize("mode", ["distributed", "local", "off"])
def test_a_device_alone_computes_what_it_computes_in_a_cohort(mode):
    state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
    datasets = _devices([5, 0, 12, 1])
    config = preset(mode, min_survivors=3 if mode == "distributed" else 1,
                    noise_multiplier=0.0 if mode == "off" else 2.0)
    users = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    refresh = [True, True, False, True]
    together = train_round(state, MODEL, users, Cohort.of(datasets), config,
                           [Stream.seeded_from(0, k) for k in range(4)], refresh)
    assert together.contributions.shape == (4, contribution_dim(MODEL))
    assert together.contributions.dtype == (torch.long if config.private else torch.float64)
    for k in range(4):
        alone = train_round(state, MODEL, users[k:k + 1], Cohort.of([datasets[k]]), config,
                            [Stream.seeded_from(0, k)], [refresh[k]])
        if config.private:  # integer units: exactly the same
            assert torch.equal(alone.contributions[0], together.contributions[k])
        else:
            torch.testing.assert_close(alone.contributions[0], together.contributions[k])
        torch.testing.assert_close(alone.users[0], together.users[k])
    if config.private:  # a device with no events still sends its noise: nothing depends on its count
        assert together.contributions[1].abs().sum() > 0


def test_the_non_private_round_is_the_plain_gradient_sum():
    state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
    (data,) = _devices([12])
    user = torch.randn(1, 4, generator=torch.Generator().manual_seed(4))
    out = train_round(state, MODEL, user, Cohort.of([data]), preset("off", device_norm=1e9),
                      [Stream.seeded_from(0, "d")], [False])
    model = EmbeddingNetwork(MODEL)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(user if name == "user_vector.weight" else state[name])
    negatives = integers(Stream.seeded_from(0, "d"), (12, 4), 50)  # what the round drew
    items = torch.cat([data.items.unsqueeze(1), negatives], dim=1)
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1
    batch = Batch(items, labels, data.weights, data.context)
    per_example_loss(model(items, data.context), batch, "bce").sum().backward()
    reference = shared_model(MODEL).layout.flatten({name: param.grad for name, param in model.named_parameters()})
    torch.testing.assert_close(out.contributions[0], reference, atol=1e-5, rtol=1e-5)


def test_every_private_contribution_is_bounded_before_noise():
    state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
    datasets = _devices([400, 3])
    config = preset("local", device_norm=4.0, noise_multiplier=1.0)
    out = train_round(state, MODEL, torch.randn(2, 4) * 5, Cohort.of(datasets), config,
                      [Stream.seeded_from(0, k) for k in range(2)], [False, False], shares=False)
    norms = out.contributions.double().norm(dim=1)
    assert norms[0] <= device_bound(config) + contribution_dim(MODEL) ** 0.5  # 400 events: projected
    assert norms[0] > 0.9 * device_bound(config)


def test_flatten_and_unflatten_are_inverse():
    state = shared_model(MODEL).init_state(torch.Generator().manual_seed(0))
    layout = shared_model(MODEL).layout
    again = layout.unflatten(layout.flatten(state))
    for name, value in state.items():
        torch.testing.assert_close(again[name].float(), value)


def test_first_user_vector_depends_on_the_stream_only():
    a = initial_user_vector(8, Stream.seeded_from(1, "init"))
    assert torch.equal(a, initial_user_vector(8, Stream.seeded_from(1, "init")))
    assert not torch.equal(a, initial_user_vector(8, Stream.seeded_from(2, "init")))
    assert 0.2 < float(a.norm()) < 3.0


def test_rank_vector_prefers_the_persons_items_and_leaves_the_state_untouched():
    model = ModelConfig(num_items=30, dim=6, use_context=False, trained_items=0)
    state = shared_model(model).init_state(torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in state.items()}
    data = LocalData(items=torch.tensor([1, 2, 3, 4, 5] * 4), weights=torch.ones(20), context=None)
    vector = fit_rank_vectors(state, model, torch.zeros(1, 6), Cohort.of([data]), torch.Generator().manual_seed(0),
                              steps=200)[0]
    scores = state["item_embedding.weight"] @ vector + state["item_bias.weight"][:, 0]
    others = torch.tensor([i for i in range(30) if i not in range(1, 6)])
    assert scores[1:6].mean() > scores[others].mean() + 0.5
    for name, value in state.items():
        torch.testing.assert_close(value, before[name])
