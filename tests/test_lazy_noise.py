"""Lazy noise on embedding tables: the same mechanism as per-step noise, drawn when rows are read."""

import torch

from attune.shared.dp import clipped_backward, make_dp_optimizer, sparse_tables
from attune.shared.loss import Batch
from attune.shared.model import ModelConfig, Personalization

STEPS, SIGMA, CLIP, BATCH, LR = 6, 0.8, 0.5, 3.0, 0.7


def _run(seed: int, lazy: bool, sigma: float = SIGMA) -> torch.Tensor:
    """Train a tiny model for a few steps on batches that read only some rows."""
    model = Personalization(ModelConfig(num_items=7, dim=2, use_context=False),
                            generator=torch.Generator().manual_seed(0))
    model.context_encoder.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    tables = [model.item_embedding.weight, model.item_bias.weight]
    sparse_tables(model, lazy)  # as local training does: lazy tables take sparse gradients
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_dp_optimizer([{"params": params, "lr": LR}], noise_multiplier=sigma, max_grad_norm=CLIP,
                            expected_batch_size=BATCH, generator=g, lazy_params=tables if lazy else None)
    for step in range(STEPS):
        items = torch.tensor([[step % 3, 3], [1, 4]])  # rows 5 and 6 are never read
        labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        batch = Batch(items, labels, torch.ones(2), None)
        if lazy:
            opt.materialize_rows(items)
        opt.zero_grad(set_to_none=True)
        clipped_backward(model, batch, "bce", CLIP)
        opt.step()
    if lazy:
        opt.materialize_all()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_without_noise_lazy_equals_eager_exactly():
    torch.testing.assert_close(_run(1, lazy=True, sigma=0.0), _run(1, lazy=False, sigma=0.0))


def test_lazy_noise_has_the_per_step_noise_distribution():
    runs = 1000
    lazy = torch.stack([_run(seed, lazy=True) for seed in range(runs)])
    eager = torch.stack([_run(10_000 + seed, lazy=False) for seed in range(runs)])
    noisy = eager.var(0) > 0  # the frozen context encoder gets no noise in either
    assert int(noisy.sum()) == 7 * 2 + 7 + 2
    assert bool((lazy.var(0)[~noisy] == 0).all())
    # every noised coordinate: same mean (within 5 standard errors), same variance (within ~4 sd)
    se = ((lazy.var(0) + eager.var(0)) / runs).sqrt()[noisy]
    assert bool(((lazy.mean(0) - eager.mean(0)).abs()[noisy] < 5 * se).all())
    ratio = lazy.var(0)[noisy] / eager.var(0)[noisy]
    assert bool(((ratio > 0.75) & (ratio < 1.33)).all()), ratio
    # rows never read get exactly the accumulated per-step variance: STEPS * (LR * SIGMA * CLIP / BATCH)^2
    expected = STEPS * (LR * SIGMA * CLIP / BATCH) ** 2
    unread = lazy[:, 10:14]  # item_embedding rows 5 and 6 (dim 2)
    assert abs(unread.var(0).mean().item() / expected - 1) < 0.1
