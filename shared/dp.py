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

The clipped sum is the gradient of ``sum_b clip_b * loss_b`` (the "ghost clipping" identity
of Li et al. 2022), and it too has a closed form in ``g`` (``clipped_backward``), so a DP step
needs no autograd pass at all and costs about one plain step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

from attune.shared.loss import Batch, logit_gradients, per_example_loss
from attune.shared.model import Personalization

# Opacus adds this to norms before dividing (optimizers/optimizer.py); kept identical so the
# closed-form path and Opacus's reference path clip by exactly the same factor.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class StepStats:
    """What one DP step did, for metrics: mean loss and how many examples were clipped."""

    examples: int
    loss_sum: float
    clipped: int


def query_gradients(vectors: torch.Tensor, logit_grads: torch.Tensor) -> torch.Tensor:
    """``v_b = sum_m g_bm * item_vector_bm``: each example's gradient w.r.t. its query, ``[b, d]``."""
    return torch.bmm(logit_grads.unsqueeze(1), vectors.detach()).squeeze(1)


def per_example_norms(
    model: Personalization,
    batch: Batch,
    query: torch.Tensor,
    vectors: torch.Tensor,
    logit_grads: torch.Tensor,
    query_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """L2 norm of each example's gradient over the model's trainable parameters, ``[b]``
    (``query_grads``: ``query_gradients(vectors, logit_grads)`` if already computed)."""
    squared = torch.zeros(len(batch), dtype=logit_grads.dtype)
    items = batch.items
    trains_items = model.item_embedding.weight.requires_grad
    trains_bias = model.item_bias.weight.requires_grad
    if trains_items or trains_bias:
        same = (items.unsqueeze(2) == items.unsqueeze(1)).to(logit_grads.dtype)
        q = (torch.bmm(same, logit_grads.unsqueeze(2)).squeeze(2) * logit_grads).sum(dim=1)
        if trains_items:
            squared = squared + q * query.detach().pow(2).sum(dim=1)
        if trains_bias:
            squared = squared + q
    trains_user = model.user_vector.weight.requires_grad
    trains_context = batch.context is not None and model.context_encoder.weight.requires_grad
    if trains_user or trains_context:
        if query_grads is None:
            query_grads = query_gradients(vectors, logit_grads)
        v = query_grads.pow(2).sum(dim=1)
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

    No autograd pass: with the per-logit gradients ``g`` scaled by each example's clip factor,
    every parameter's gradient has a closed form (item rows: ``g_bm * query_b`` added at
    ``items_bm``; bias rows: ``g_bm``; user vector: ``sum_b v_b`` with ``v_b = sum_m g_bm
    item_vector_bm``; context encoder: ``sum_b v_b x_b^T``). Item tables whose embedding is
    ``sparse`` get a sparse gradient (the rows of the batch only), as autograd would give.
    An empty batch leaves zero gradients, so the optimizer still adds noise (as Opacus does).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    examples = len(batch)
    with torch.no_grad():
        if examples:
            query = model.person(examples, batch.context)
            vectors = model.item_embedding(batch.items)
            logits = model.score_with(query, vectors, model.item_bias(batch.items))
            losses = per_example_loss(logits, batch, loss)
            logit_grads = logit_gradients(logits, batch, loss)
            query_grads = query_gradients(vectors, logit_grads)
            norms = per_example_norms(model, batch, query, vectors, logit_grads, query_grads)
            factors = clip_factors(norms, max_grad_norm).unsqueeze(1)
            _write_gradients(model, batch, query, logit_grads * factors, query_grads * factors)
    for p in params:
        if p.grad is None:  # a parameter the batch did not reach (or an empty batch)
            p.grad = torch.zeros_like(p)
    if not examples:
        return StepStats(examples=0, loss_sum=0.0, clipped=0)
    return StepStats(examples=examples, loss_sum=float(losses.sum()), clipped=int((factors < 1.0).sum()))


def _write_gradients(model: Personalization, batch: Batch, query: torch.Tensor, scaled: torch.Tensor,
                     scaled_query_grads: torch.Tensor) -> None:
    """``.grad`` of ``sum_b clip_b * loss_b`` from the clipped per-logit gradients ``scaled`` and
    per-query gradients ``scaled_query_grads``."""
    rows = batch.items.reshape(-1)
    for module, values in (
        (model.item_embedding, lambda: (scaled.unsqueeze(2) * query.unsqueeze(1)).flatten(0, 1)),
        (model.item_bias, lambda: scaled.reshape(-1, 1)),
    ):
        weight = module.weight
        if weight.requires_grad:
            if module.sparse:
                # rows are item indices of the batch, in range by construction: no invariant check
                weight.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values(), weight.shape,
                                                      check_invariants=False)
            else:
                weight.grad = torch.zeros_like(weight).index_add_(0, rows, values())
    if model.user_vector.weight.requires_grad:
        model.user_vector.weight.grad = scaled_query_grads.sum(dim=0, keepdim=True)
    if batch.context is not None and model.context_encoder.weight.requires_grad:
        model.context_encoder.weight.grad = scaled_query_grads.T @ batch.context


class SingleStepDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's fast-gradient-clipping optimizer without the per-step copy of every gradient.

    Attune takes exactly one backward pass per step and clears gradients to ``None`` between
    steps, so the clipped sum can be used in place: Opacus's ``accumulate`` deep-copies it (a full
    copy of the item table each step). Noise, scaling and accounting hooks are unchanged.
    """

    def accumulate(self) -> None:
        for p in self.params:
            p.summed_grad = p.grad.data if p.summed_grad is None else p.summed_grad + p.grad.data


class LazyNoiseDPOptimizer(SingleStepDPOptimizer):
    """DP-SGD whose noise on embedding tables is drawn when a row is read, not at every step.

    With plain SGD the noise a row has received is a sum of independent Gaussians, so drawing it
    in one go when the row is next read (``materialize_rows``) or at the end of the round
    (``materialize_all``) gives every read and the final parameters exactly the distribution
    of per-step noise: the same mechanism and the same accounting, without drawing
    ``items x dim`` Gaussians at every step. Other parameters get Opacus's per-step noise.
    Only valid for SGD without momentum or weight decay (what ``make_dp_optimizer`` builds).
    The tables' gradients may be sparse (``sparse_tables``): then a step touches only the rows
    of its batch, and no pass over the whole table happens until ``materialize_all``.
    """

    def __init__(self, *args: object, lazy_params: list[torch.nn.Parameter], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = {id(p): p for p in lazy_params}
        rates = {g["lr"] for g in self.original_optimizer.param_groups
                 for p in g["params"] if id(p) in self._lazy}
        rows = {p.shape[0] for p in lazy_params}
        if len(rates) != 1 or len(rows) != 1:
            raise ValueError("lazy tables must share one learning rate and one row count")
        self._lr = rates.pop()
        self._variance = 0.0  # per-coordinate noise variance so far, in parameter units
        self._marks = torch.zeros(rows.pop(), dtype=torch.float64)  # variance already drawn per row

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            if id(p) in self._lazy:  # may be sparse: only the rows the batch touched
                p.grad = p.summed_grad if p.summed_grad.is_sparse else p.summed_grad.view_as(p)
            else:
                noise = _generate_noise(std=std, reference=p.summed_grad, generator=self.generator,
                                        secure_mode=self.secure_mode)
                p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        result = super().step(closure)
        if not self._is_last_step_skipped:
            std = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
            self._variance += (self._lr * std) ** 2
        return result

    def materialize_rows(self, rows: torch.Tensor) -> None:
        """Add the pending noise of ``rows`` (any shape, repeats allowed) before they are read."""
        self._materialize(rows.reshape(-1).unique())

    def materialize_all(self) -> None:
        """Add every row's pending noise: call before the parameters leave the optimizer."""
        self._materialize(torch.arange(self._marks.shape[0]))

    def _materialize(self, rows: torch.Tensor) -> None:
        scale = (self._variance - self._marks[rows]).sqrt().float().unsqueeze(1)
        with torch.no_grad():
            for param in self._lazy.values():
                noise = torch.randn((rows.shape[0], *param.shape[1:]), generator=self.generator)
                param.index_add_(0, rows, noise.view(rows.shape[0], -1).mul_(scale).view_as(noise))
        self._marks[rows] = self._variance


def sparse_tables(model: Personalization, sparse: bool) -> None:
    """Let the item tables produce sparse gradients (rows of the batch only) or dense ones."""
    model.item_embedding.sparse = sparse
    model.item_bias.sparse = sparse


def make_dp_optimizer(
    param_groups: list[dict],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
    secure_mode: bool = False,
    lazy_params: list[torch.nn.Parameter] | None = None,
) -> SingleStepDPOptimizer:
    """Opacus's optimizer (SGD per ``param_groups``): noise onto an already clipped sum, then / batch."""
    options = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )
    if lazy_params:
        return LazyNoiseDPOptimizer(torch.optim.SGD(param_groups), lazy_params=lazy_params, **options)
    return SingleStepDPOptimizer(torch.optim.SGD(param_groups), **options)
