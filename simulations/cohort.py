"""Many devices' local rounds at once: the fast backend's batched form of ``train_round``.

One device at a time, a local round is a handful of tiny DP steps whose cost is Python and
operator dispatch (about 1 ms a step). Here each step runs once for a whole cohort. Every device
keeps its own copy of the global side in one ``[devices, items, dim]`` tensor. Every example
carries its device's row offset. The clipped gradients are those of ``attune.shared.dp``, in
closed form, index-added into each device's own rows.

Randomness comes from each device's own generator, in exactly the order ``train_round`` draws
it: per step the Poisson mask and the negatives, then Opacus's noise per parameter. So a
device's update equals what its own ``train_round`` returns, up to float rounding
(``tests/test_cohort.py``). The noise is Opacus's: std ``noise_multiplier * max_grad_norm`` on
the clipped sum, then the sum is divided by the expected batch size.

Covered: the partial-local round without context features, with the user vector frozen in the
global phase and eager noise (``lazy_noise`` off). ``supported`` says
when; otherwise the fast backend runs ``train_round`` device by device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.client.training import LocalData, RoundResult, draw_examples, lazy_noise
from attune.shared.config import TrainConfig
from attune.shared.dp import NORM_EPS
from attune.shared.loss import Batch, logit_gradients, per_example_loss
from attune.shared.model import GLOBAL_PARAMS, ModelConfig
from attune.shared.user_level import clip_update


def supported(model: ModelConfig, train: TrainConfig) -> bool:
    """Whether ``train_cohort`` computes exactly what ``train_round`` would for this setup."""
    return not model.use_context and not train.joint_user and not lazy_noise(model, train)


@dataclass
class _Step:
    """One step's examples for every device, concatenated in device order."""

    batch: Batch
    device: torch.Tensor  # long [examples]: position of each example's device in the cohort
    counts: list[int]


def _draw(datasets: list[LocalData], generators: list[torch.Generator], config: TrainConfig,
          num_items: int) -> _Step:
    """Each device's Poisson batch and negatives, drawn as its own ``sample_batch`` would."""
    items, weights, counts = [], [], []
    for data, generator in zip(datasets, generators, strict=True):
        chosen, columns = draw_examples(data, config.sample_rate, config.negatives, num_items, generator)
        items.append(columns)
        weights.append(data.weights[chosen])
        counts.append(int(chosen.shape[0]))
    stacked = torch.cat(items)
    labels = torch.zeros(stacked.shape)
    labels[:, 0] = 1.0
    device = torch.repeat_interleave(torch.arange(len(datasets)), torch.tensor(counts))
    return _Step(Batch(stacked, labels, torch.cat(weights), None), device, counts)


def _noise(shape: tuple[int, ...], std: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Opacus's ``_generate_noise`` for each device's parameter of ``shape``, stacked."""
    if std == 0:
        return torch.zeros((len(generators), *shape))
    return torch.stack([torch.normal(0.0, std, size=shape, generator=g) for g in generators])


def train_cohort(
    weights: dict[str, torch.Tensor],
    users: torch.Tensor,
    datasets: list[LocalData],
    config: TrainConfig,
    generators: list[torch.Generator],
) -> tuple[list[RoundResult], torch.Tensor]:
    """Every device's ``train_round`` from the global ``weights`` and its user vector (``users``
    ``[devices, dim]``): the results in order, and the user vectors after the round."""
    table, bias = weights["item_embedding.weight"], weights["item_bias.weight"]
    num_items, count = table.shape[0], len(datasets)
    tables = table.unsqueeze(0).repeat(count, 1, 1)  # each device's own copy
    biases = bias[:, 0].unsqueeze(0).repeat(count, 1)
    users = users.clone()
    expected = torch.tensor([config.sample_rate * len(d) for d in datasets])
    std = config.noise_multiplier * config.max_grad_norm if config.private else 0.0
    loss_sum, examples, clipped = torch.zeros(count), torch.zeros(count), torch.zeros(count)
    for global_side, epochs in ((False, config.user_epochs), (True, config.local_epochs)):
        for _ in range(config.steps(epochs)):
            step = _draw(datasets, generators, config, num_items)
            rows = step.device.unsqueeze(1) * num_items + step.batch.items  # [b, m] in the flat tables
            query = users[step.device]
            vectors = tables.view(-1, table.shape[1])[rows]
            logits = torch.bmm(vectors, query.unsqueeze(2)).squeeze(2) + biases.view(-1)[rows]
            grads = logit_gradients(logits, step.batch, config.loss)
            query_grads = torch.bmm(grads.unsqueeze(1), vectors).squeeze(1)
            if global_side:
                same = (step.batch.items.unsqueeze(2) == step.batch.items.unsqueeze(1)).to(grads.dtype)
                q = (torch.bmm(same, grads.unsqueeze(2)).squeeze(2) * grads).sum(dim=1)
                squared = q * query.pow(2).sum(dim=1) + q
            else:
                squared = query_grads.pow(2).sum(dim=1)
            factors = (config.max_grad_norm / (squared.sqrt() + NORM_EPS)).clamp(max=1.0)
            if not config.private:
                factors = torch.ones_like(factors)
            scaled = grads * factors.unsqueeze(1)
            losses = per_example_loss(logits, step.batch, config.loss)
            loss_sum.index_add_(0, step.device, losses)
            examples += torch.tensor(step.counts, dtype=torch.float32)
            clipped.index_add_(0, step.device, (factors < 1.0).float())
            if global_side:
                flat = rows.reshape(-1)
                summed = torch.zeros(count * num_items, table.shape[1]).index_add_(
                    0, flat, (scaled.unsqueeze(2) * query.unsqueeze(1)).flatten(0, 1))
                summed_bias = torch.zeros(count * num_items, 1).index_add_(0, flat, scaled.reshape(-1, 1))
                noise = _noise(tuple(table.shape), std, generators)
                noise_bias = _noise((num_items, 1), std, generators)
                scale = expected.view(-1, 1, 1)
                tables -= config.lr * (summed.view(count, num_items, -1) + noise) / scale
                biases -= config.lr * ((summed_bias.view(count, num_items, 1) + noise_bias) / scale)[..., 0]
            else:
                summed = torch.zeros(count, users.shape[1]).index_add_(
                    0, step.device, query_grads * factors.unsqueeze(1))
                noise = _noise((1, users.shape[1]), std, generators)[:, 0]
                users -= config.user_lr * (summed + noise) / expected.unsqueeze(1)
    results = []
    for k in range(count):
        update = {"item_embedding.weight": tables[k] - table,
                  "item_bias.weight": biases[k].unsqueeze(1) - bias,
                  "context_encoder.weight": torch.zeros_like(weights["context_encoder.weight"])}
        update = {name: update[name] for name in GLOBAL_PARAMS}
        if config.update_clip > 0:
            update, _ = clip_update(update, config.update_clip)
        results.append(RoundResult(update=update, examples=len(datasets[k]), steps=config.steps_per_round,
                                   mean_loss=float(loss_sum[k]) / max(float(examples[k]), 1.0),
                                   clipped_fraction=float(clipped[k]) / max(float(examples[k]), 1.0)))
    return results, users
