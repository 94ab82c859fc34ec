"""DP-SGD step for the personalization model, with per-sample norms in closed form.

Unit of privacy: one interaction event (one training example). Each example's gradient is
clipped to ``max_grad_norm`` and Gaussian noise of std ``noise_multiplier * max_grad_norm`` is
added to the sum (Abadi et al. 2016, "Deep Learning with Differential Privacy"); the noise,
scaling and accounting hooks are Opacus's own ``DPOptimizerFastGradientClipping``.

Why closed form: Opacus's default per-sample gradients materialize ``batch x items x dim`` for
every embedding table. For a dot-product scorer the per-sample gradient norm only needs the
per-logit loss gradients ``g = dL/dz`` (``[batch, m]``):

- item vectors: example ``b`` touches rows ``items[b, m]`` with ``g[b, m] * query[b]``, so
  ``||.||^2 = ||query_b||^2 * Q_b`` where ``Q_b = sum_{m,m'} g_bm g_bm' [items_bm == items_bm']``
  (repeated items in one example add up before the norm);
- item bias: ``Q_b``;
- user vector: ``v_b = sum_m g_bm * item_vector_bm``, norm ``||v_b||^2``;
- context encoder (``query = user + W x``): ``v_b x_b^T``, norm ``||v_b||^2 ||x_b||^2``.

The clipped sum is then one ordinary backward pass of ``sum_b clip_b * loss_b``
(the "ghost clipping" identity of Li et al. 2022), so a DP step costs about one plain step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping

from attune.shared.model import Personalization

# Opacus adds this to norms before dividing (optimizers/optimizer.py); kept identical so the
# closed-form path and Opacus's reference path clip by exactly the same factor.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class Batch:
    """One (possibly empty) Poisson batch of training examples.

    ``items[:, 0]`` is the interacted item and ``items[:, 1:]`` the sampled negatives;
    ``labels`` is 1 for the positive column and 0 elsewhere.
    """

    items: torch.Tensor  # long [b, m]
    labels: torch.Tensor  # float [b, m]
    weights: torch.Tensor  # float [b]: event-type weight of each example
    context: torch.Tensor | None  # float [b, features]

    def __len__(self) -> int:
        return int(self.items.shape[0])


@dataclass(frozen=True)
class StepStats:
    """What one DP step did, for metrics: mean loss and how many examples were clipped."""

    examples: int
    loss_sum: float
    clipped: int


def per_example_loss(logits: torch.Tensor, batch: Batch, loss: str) -> torch.Tensor:
    """Weighted loss of each example, ``[b]``: BCE over all columns, or BPR (pos vs each neg)."""
    if loss == "bce":
        per = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch.labels, reduction="none"
        ).sum(dim=1)
    elif loss == "bpr":
        margin = logits[:, :1] - logits[:, 1:]
        per = torch.nn.functional.softplus(-margin).sum(dim=1)
    else:
        raise ValueError(f"unknown loss {loss!r}: use 'bce' or 'bpr'")
    return per * batch.weights


def per_example_norms(
    model: Personalization,
    batch: Batch,
    query: torch.Tensor,
    logit_grads: torch.Tensor,
) -> torch.Tensor:
    """L2 norm of each example's gradient over the model's trainable parameters, ``[b]``."""
    squared = torch.zeros(len(batch), dtype=logit_grads.dtype)
    items = batch.items
    trains_items = model.item_embedding.weight.requires_grad
    trains_bias = model.item_bias.weight.requires_grad
    if trains_items or trains_bias:
        same = (items.unsqueeze(2) == items.unsqueeze(1)).to(logit_grads.dtype)
        q = torch.einsum("bm,bmn,bn->b", logit_grads, same, logit_grads)
        if trains_items:
            squared = squared + q * query.detach().pow(2).sum(dim=1)
        if trains_bias:
            squared = squared + q
    trains_user = model.user_vector.weight.requires_grad
    trains_context = batch.context is not None and model.context_encoder.weight.requires_grad
    if trains_user or trains_context:
        vectors = model.item_embedding.weight.detach()[items]
        v = torch.einsum("bm,bmd->bd", logit_grads, vectors).pow(2).sum(dim=1)
        if trains_user:
            squared = squared + v
        if trains_context:
            squared = squared + v * batch.context.pow(2).sum(dim=1)
    return squared.sqrt()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's flat clipping factor ``min(1, C / (norm + 1e-6))``."""
    return (max_grad_norm / (norms + NORM_EPS)).clamp(max=1.0)


def clipped_backward(
    model: Personalization, batch: Batch, loss: str, max_grad_norm: float
) -> StepStats:
    """Put the sum of per-example clipped gradients into ``.grad`` of every trainable parameter.

    An empty batch leaves zero gradients, so the optimizer still adds noise (as Opacus does).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if len(batch) == 0:
        for p in params:
            p.grad = torch.zeros_like(p)
        return StepStats(examples=0, loss_sum=0.0, clipped=0)
    query = model.person(len(batch), batch.context)
    logits = model.score(query, batch.items)
    losses = per_example_loss(logits, batch, loss)
    (logit_grads,) = torch.autograd.grad(losses.sum(), logits, retain_graph=True)
    norms = per_example_norms(model, batch, query, logit_grads)
    factors = clip_factors(norms, max_grad_norm)
    for p in params:
        p.grad = None
    (losses * factors).sum().backward()
    for p in params:
        if p.grad is None:  # a parameter the batch did not reach (e.g. context off)
            p.grad = torch.zeros_like(p)
    return StepStats(
        examples=len(batch),
        loss_sum=float(losses.detach().sum()),
        clipped=int((factors < 1.0).sum()),
    )


class SingleStepDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's fast-gradient-clipping optimizer without the per-step copy of every gradient.

    Attune takes exactly one backward pass per step and clears gradients to ``None`` between
    steps, so the clipped sum can be used in place: Opacus's ``accumulate`` deep-copies it (a full
    copy of the item table each step). Noise, scaling and accounting hooks are unchanged.
    """

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad.data if p.summed_grad is None else p.summed_grad + p.grad.data


def make_dp_optimizer(
    param_groups: list[dict],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
) -> SingleStepDPOptimizer:
    """Opacus's optimizer (SGD per ``param_groups``): noise onto an already clipped sum, then / batch."""
    return SingleStepDPOptimizer(
        torch.optim.SGD(param_groups),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )
