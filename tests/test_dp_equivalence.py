"""The closed-form DP step equals Opacus's reference per-sample path (hooks mode)."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from attune.shared.dp import clipped_backward, make_dp_optimizer
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import ModelConfig, Personalization

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def _batch(size: int, items: int, m: int, generator: torch.Generator, context: bool) -> Batch:
    chosen = torch.randint(0, items, (size, m), generator=generator)
    if size:
        chosen[0, 2] = chosen[0, 0]  # a repeated item inside one example
        chosen[1 % size, 1] = chosen[1 % size, 0]
    labels = torch.zeros(size, m)
    labels[:, 0] = 1
    features = torch.randn(size, 9, generator=generator) if context else None
    return Batch(chosen, labels, torch.rand(size, generator=generator) + 0.5, features)


def _reference_grads(model, batch, loss, clip, sigma, seed, expected):
    """Opacus's own per-sample gradients, clipping and noise on a copy of the model."""
    module = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    params = [p for p in module.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma,
                      max_grad_norm=clip, expected_batch_size=expected,
                      generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    if len(batch):
        per_example_loss(module(batch.items, batch.context), batch, loss).sum().backward()
    else:  # Opacus's empty-batch path: zero per-sample gradients of batch size 0
        for p in params:
            p.grad_sample = torch.zeros(0, *p.shape)
    opt.pre_step()
    return [p.grad.clone() for p in params]


def _closed_form_grads(model, batch, loss, clip, sigma, seed, expected):
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_dp_optimizer([{"params": params, "lr": 0.0}], noise_multiplier=sigma,
                            max_grad_norm=clip, expected_batch_size=expected,
                            generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    clipped_backward(model, batch, loss, clip)
    opt.pre_step()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("size", [0, 1, 3, 17, 64])
@pytest.mark.parametrize("loss", ["bce", "bpr"])
@pytest.mark.parametrize("sigma", [0.0, 1.3])
@pytest.mark.parametrize("context", [True, False])
def test_closed_form_matches_opacus_hooks(size, loss, sigma, context):
    g = torch.Generator().manual_seed(size * 7 + 1)
    model = Personalization(ModelConfig(num_items=13, dim=4, use_context=context), generator=g)
    with torch.no_grad():  # non-trivial context encoder and biases
        model.context_encoder.weight.normal_(0, 0.5, generator=g)
        model.item_bias.weight.normal_(0, 0.5, generator=g)
    batch = _batch(size, 13, 4, g, context)
    # clip small enough that some examples are clipped and some not
    args = (model, batch, loss, 0.6, sigma, 1234, 8.0)
    expected = _reference_grads(*args)
    got = _closed_form_grads(*args)
    for e, o in zip(expected, got, strict=False):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)


def test_frozen_global_side_clips_user_vector_only():
    g = torch.Generator().manual_seed(3)
    model = Personalization(ModelConfig(num_items=11, dim=3), generator=g)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "user_vector.weight")
    batch = _batch(9, 11, 3, g, context=True)
    args = (model, batch, "bce", 0.05, 0.0, 1, 4.0)
    torch.testing.assert_close(_closed_form_grads(*args), _reference_grads(*args))
