"""Local training on the device's own events: DP-SGD with Poisson sampling, accounted by Opacus.

One round of the default (partially local) algorithm:
1. fit the person's user vector to the freshly received global item side (global side frozen);
2. train everything jointly, the global side now learning from a user vector that fits;
3. return the change of the global side. The user vector stays on the device.

Both phases are DP-SGD steps on the same events with the same sample rate and noise, all logged
in the device's ledger, so the update that leaves is (epsilon, delta)-DP per event.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attune.shared.accounting import PrivacyLedger
from attune.shared.config import TrainConfig
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import GLOBAL_PARAMS, ModelConfig, Personalization
from attune.shared.user_level import clip_update


@dataclass(frozen=True)
class LocalData:
    """The device's training examples as tensors (one per event)."""

    items: torch.Tensor  # long [n]
    weights: torch.Tensor  # float [n]
    context: torch.Tensor | None  # float [n, features]

    def __len__(self) -> int:
        return int(self.items.shape[0])


@dataclass(frozen=True)
class RoundResult:
    update: dict[str, torch.Tensor]
    examples: int
    steps: int
    mean_loss: float
    clipped_fraction: float


def draw_examples(
    data: LocalData, sample_rate: float, negatives: int, num_items: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson-sample examples (each independently with ``sample_rate``) and draw negatives:
    the chosen event indices ``[b]`` and item columns ``[b, 1 + negatives]`` (positive first)."""
    chosen = (torch.rand(len(data), generator=generator) < sample_rate).nonzero().squeeze(1)
    negative_items = torch.randint(0, num_items, (int(chosen.shape[0]), negatives), generator=generator)
    return chosen, torch.cat([data.items[chosen].unsqueeze(1), negative_items], dim=1)


def sample_batch(
    data: LocalData, sample_rate: float, negatives: int, num_items: int, generator: torch.Generator
) -> Batch:
    """One Poisson batch with its negatives (``draw_examples``), labels and context."""
    chosen, items = draw_examples(data, sample_rate, negatives, num_items, generator)
    count = int(chosen.shape[0])
    labels = torch.zeros(count, negatives + 1)
    labels[:, 0] = 1.0
    context = data.context[chosen] if data.context is not None else None
    return Batch(items=items, labels=labels, weights=data.weights[chosen], context=context)


def _set_trainable(model: Personalization, *, global_side: bool, user: bool = True) -> None:
    for name, param in model.named_parameters():
        if name in GLOBAL_PARAMS:
            usable = name != "context_encoder.weight" or model.config.use_context
            param.requires_grad_(global_side and usable)
        else:
            param.requires_grad_(user)


# Below this many item-table coordinates, drawing the whole table's noise each step is cheaper
# than tracking rows (benchmarks/dp_step.py: eager wins at 1k items x 32, lazy from 10k).
LAZY_NOISE_MIN_COORDINATES = 100_000


def lazy_noise(model: ModelConfig, config: TrainConfig) -> bool:
    """Whether the item tables' noise is drawn lazily (large tables) or every step."""
    return config.lazy_noise and model.num_items * (model.dim + 1) >= LAZY_NOISE_MIN_COORDINATES


def _run_phase(
    model: Personalization,
    data: LocalData,
    config: TrainConfig,
    steps: int,
    ledger: PrivacyLedger,
    generator: torch.Generator,
) -> tuple[float, int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    user = model.user_vector.weight
    groups = [
        {"params": [p for p in params if p is user], "lr": config.user_lr},
        {"params": [p for p in params if p is not user], "lr": config.lr},
    ]
    groups = [g for g in groups if g["params"]]
    expected_batch = config.sample_rate * len(data)
    loss_sum, examples, clipped = 0.0, 0, 0
    tables = [model.item_embedding.weight, model.item_bias.weight]
    lazy = []
    if config.private and lazy_noise(model.config, config):
        lazy = [p for p in tables if p.requires_grad]
    if config.private:
        from attune.shared.dp import clipped_backward, make_dp_optimizer, sparse_tables  # Opacus: ~1.5 s

        sparse_tables(model, bool(lazy))
        optimizer = make_dp_optimizer(
            groups,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            expected_batch_size=expected_batch,
            generator=generator,
            lazy_params=lazy,
        )
        optimizer.attach_step_hook(ledger.accountant.get_optimizer_hook_fn(config.sample_rate))
    else:
        optimizer = torch.optim.SGD(groups)
    num_items = model.config.num_items
    for _ in range(steps):
        batch = sample_batch(data, config.sample_rate, config.negatives, num_items, generator)
        if lazy:
            optimizer.materialize_rows(batch.items)  # type: ignore[union-attr]
        optimizer.zero_grad(set_to_none=True)
        if config.private:
            stats = clipped_backward(model, batch, config.loss, config.max_grad_norm)
            loss_sum, clipped = loss_sum + stats.loss_sum, clipped + stats.clipped
        elif len(batch):
            losses = per_example_loss(model(batch.items, batch.context), batch, config.loss)
            (losses.sum() / expected_batch).backward()
            loss_sum += float(losses.detach().sum())
        examples += len(batch)
        optimizer.step()
    if lazy:
        optimizer.materialize_all()  # type: ignore[union-attr]
        sparse_tables(model, False)
    return loss_sum, examples, clipped


def train_round(
    model: Personalization,
    data: LocalData,
    config: TrainConfig,
    ledger: PrivacyLedger,
    generator: torch.Generator,
) -> RoundResult:
    """Run one local round and return the change of the global side."""
    before = model.global_state()
    loss_sum, examples, clipped, steps = 0.0, 0, 0, 0
    for global_side, epochs in ((False, config.user_epochs), (True, config.local_epochs)):
        phase_steps = config.steps(epochs)
        if phase_steps == 0:
            continue
        _set_trainable(model, global_side=global_side, user=not global_side or config.joint_user)
        phase = _run_phase(model, data, config, phase_steps, ledger, generator)
        loss_sum, examples, clipped = loss_sum + phase[0], examples + phase[1], clipped + phase[2]
        steps += phase_steps
    _set_trainable(model, global_side=True, user=True)
    after = model.global_state()
    update = {name: after[name] - before[name] for name in GLOBAL_PARAMS}
    if config.update_clip > 0:  # user-level DP: bound what this whole person can move the sum
        update, _ = clip_update(update, config.update_clip)
    return RoundResult(
        update=update,
        examples=len(data),
        steps=steps,
        mean_loss=loss_sum / max(examples, 1),
        clipped_fraction=clipped / max(examples, 1),
    )


def fit_rank_vector(
    model: Personalization,
    data: LocalData,
    *,
    steps: int = 40,
    lr: float = 0.1,
    negatives: int = 4,
    weight_decay: float = 1e-3,
    generator: torch.Generator,
) -> torch.Tensor:
    """Fit a user vector for *ranking only*, against the frozen global side, without DP.

    It never influences anything that leaves the device (the update is computed with the DP
    user vector), so it needs no noise; starting from the DP user vector, it sharpens on-device
    ranking. Returns ``[dim]``; the model's own user vector is left untouched.
    """
    start = model.user_vector.weight.detach()[0].clone()
    if len(data) == 0:
        return start
    vector = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=lr, weight_decay=weight_decay)
    num_items = model.config.num_items
    with torch.no_grad():
        shift = (
            model.context_encoder(data.context)
            if data.context is not None and model.config.use_context
            else torch.zeros(len(data), model.config.dim)
        )
    for _ in range(steps):
        batch = sample_batch(data, 1.0, negatives, num_items, generator)
        with torch.no_grad():
            vectors, bias = model.item_embedding(batch.items), model.item_bias(batch.items)
        logits = model.score_with(vector + shift, vectors, bias)
        loss = per_example_loss(logits, batch, "bce").mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vector.detach()
