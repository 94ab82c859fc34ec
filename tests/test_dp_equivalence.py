"""The device round's closed-form clipped sums equal Opacus's reference per-sample path (hooks
mode): for the shared side (item rows, biases, context encoder) and for the user vector."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from attune.client.training import Cohort, LocalData, draw_negatives, train_round
from attune.shared.config import preset
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import EmbeddingNetwork, ModelConfig, shared_model
from attune.shared.randomness import Stream

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
CLIP = 0.6


def _setup(events: int, context: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    model_config = ModelConfig(num_items=13, dim=4, use_context=context, trained_items=0)
    model = EmbeddingNetwork(model_config, generator=g)
    with torch.no_grad():  # non-trivial context encoder and biases
        model.context_encoder.weight.normal_(0, 0.5, generator=g)
        model.item_bias.weight.normal_(0, 0.5, generator=g)
        model.user_vector.weight.normal_(0, 1.0, generator=g)
    items = torch.randint(0, 13, (events,), generator=g)
    features = torch.randn(events, model_config.context_features, generator=g) if context else None
    data = LocalData(items, torch.rand(events, generator=g) + 0.5, features)
    return model_config, model, data


def _opacus_clipped_sum(model, data, negatives, loss, trainable):
    """Opacus's own per-sample gradients and flat clipping (no noise) on a copy of the model."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    module = GradSampleModule(model, loss_reduction="sum")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=CLIP,
                            expected_batch_size=1)
    optimizer.zero_grad()
    items = torch.cat([data.items.unsqueeze(1), negatives], dim=1)
    labels = torch.zeros(items.shape)
    labels[:, 0] = 1.0
    batch = Batch(items, labels, data.weights, data.context)
    per_example_loss(module(items, data.context), batch, loss).sum().backward()
    optimizer.pre_step()
    return {name: p.grad.clone() for (name, p) in model.named_parameters() if p.requires_grad}  # the wrapped one


@pytest.mark.parametrize("events", [1, 3, 17])
@pytest.mark.parametrize("loss", ["bce", "bpr"])
@pytest.mark.parametrize("context", [True, False])
def test_shared_side_sum_matches_opacus_hooks(events, loss, context):
    model_config, model, data = _setup(events, context, seed=events * 7 + 1)
    config = preset("off", loss=loss, negatives=3, device_norm=1e9)
    # the negatives the round will draw from a stream with this key (repeated items do occur)
    negatives = draw_negatives(Cohort.of([data]), config, 13, [Stream.seeded_from(0, "x")], [0])
    trainable = ["item_embedding.weight", "item_bias.weight"] + (["context_encoder.weight"] if context else [])
    expected = _opacus_clipped_sum(model, data, negatives, loss, trainable)
    # the round's private path without rounding and noise: clip, then sum (units of 2**bits per clip)
    private = preset("local", loss=loss, negatives=3, clip=CLIP, quantum_bits=24, device_norm=1e9,
                     noise_multiplier=1e-12, user_noise_multiplier=1e-12)
    out = train_round(model.shared_state(), model_config, model.user_vector.weight.detach(), Cohort.of([data]),
                      private, [Stream.seeded_from(0, "x")], [False], shares=False)
    got = out.contributions[0].double() / 2.0**24 * CLIP
    want = shared_model(model_config).layout.flatten({name: expected.get(name, torch.zeros_like(value))
                    for name, value in model.shared_state().items()})
    torch.testing.assert_close(got, want, atol=2e-6 * max(1, events), rtol=0)


def test_user_vector_refresh_clips_like_opacus():
    model_config, model, data = _setup(9, context=True, seed=3)
    config = preset("local", negatives=2, user_clip=CLIP, clip=1.0, quantum_bits=24, user_steps=1,
                    user_noise_multiplier=1e-12, user_lr=1.0, noise_multiplier=1e-12)
    negatives = draw_negatives(Cohort.of([data]), config, 13, [Stream.seeded_from(0, "y")], [0])
    expected = _opacus_clipped_sum(model, data, negatives, "bce", ["user_vector.weight"])["user_vector.weight"][0]
    start = model.user_vector.weight.detach()
    out = train_round(model.shared_state(), model_config, start, Cohort.of([data]), config,
                      [Stream.seeded_from(0, "y")], [True], shares=False)
    step = (start[0] - out.users[0]).double()  # user_lr times the normalised noised sum
    torch.testing.assert_close(step, (expected / expected.norm()).double(), atol=1e-6, rtol=0)

