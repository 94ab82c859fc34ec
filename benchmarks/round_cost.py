"""A device's DP round against a plain gradient step and stock Opacus, measured in one run.

For catalogs of 1k, 10k and 100k items (dim 32, 4 negatives, a device with 256 events), CPU time of:
- plain: one autograd backward pass over the 256 events (no clipping, no noise), the reference;
- Attune, clipped sum: the round's per-event clipping, integer rounding and per-device bound in
  closed form (``train_round`` with its noise shares left out);
- Attune, DP contribution: the same plus the discrete Gaussian noise share on every coordinate of
  the shared side (what a device really sends);
- Opacus ghost clipping and Opacus per-sample hooks computing the same clipped sum (hooks are
  skipped at 100k items, where they build a 3.3 GB per-sample tensor).
Modes are timed in interleaved trials so a slow spell of this shared machine hits them alike;
medians and ratios to plain are printed and written to benchmarks/results/round_cost.json.

    .venv/bin/python benchmarks/round_cost.py
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer

from attune.client.training import Cohort, LocalData, train_round
from attune.shared.config import preset
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import EmbeddingNetwork, ModelConfig
from attune.shared.randomness import Stream

warnings.filterwarnings("ignore")
EVENTS, DIM, NEGATIVES, TRIALS = 256, 32, 4, 9


def timed(step, repeats: int) -> float:
    step()  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        step()
    return (time.process_time() - start) / repeats * 1000


def interleaved(steps: dict, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(TRIALS):
        for name, step in steps.items():
            samples[name].append(timed(step, repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def setup(items: int):
    g = torch.Generator().manual_seed(0)
    model_config = ModelConfig(num_items=items, dim=DIM, use_context=False)
    model = EmbeddingNetwork(model_config, generator=g)
    data = LocalData(torch.randint(0, items, (EVENTS,), generator=g), torch.ones(EVENTS), None)
    columns = torch.cat([data.items.unsqueeze(1), torch.randint(0, items, (EVENTS, NEGATIVES), generator=g)], 1)
    labels = torch.zeros(columns.shape)
    labels[:, 0] = 1
    return model_config, model, data, Batch(columns, labels, data.weights, None)


def plain(model, batch):
    params = [model.item_embedding.weight, model.item_bias.weight]

    def step():
        for p in params:
            p.grad = None
        per_example_loss(model(batch.items), batch, "bce").sum().backward()

    return step


def attune(model_config, model, data, shares: bool):
    config = preset("distributed", noise_multiplier=1.0, min_survivors=100, negatives=NEGATIVES)
    state, user = model.shared_state(), model.user_vector.weight.detach()
    cohort = Cohort.of([data])

    def step():
        train_round(state, model_config, user, cohort, config, [Stream.seeded_from(0)], [False], shares=shares)

    return step


class ExampleBCE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1)
        return per if self.reduction == "none" else per.mean()


def ghost(model, batch):
    model.user_vector.weight.requires_grad_(False)
    model.context_encoder.weight.requires_grad_(False)
    data = torch.utils.data.TensorDataset(batch.items, batch.labels)
    module, opt, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
        data_loader=torch.utils.data.DataLoader(data, batch_size=EVENTS), criterion=ExampleBCE(),
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False)

    def step():
        opt.zero_grad()
        criterion(module(batch.items), batch.labels).backward()
        opt.step()

    return step


def hooks(model, batch):
    model.user_vector.weight.requires_grad_(False)
    model.context_encoder.weight.requires_grad_(False)
    module = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.0),
                      noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=EVENTS)

    def step():
        opt.zero_grad()
        per_example_loss(module(batch.items), batch, "bce").sum().backward()
        opt.step()

    return step


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for items in (1_000, 10_000, 100_000):
        model_config, model, data, batch = setup(items)
        steps = {"plain": plain(model, batch), "attune_clipped": attune(model_config, model, data, False),
                 "attune_dp": attune(model_config, model, data, True)}
        fresh = EmbeddingNetwork(model_config, generator=torch.Generator().manual_seed(0))
        steps["opacus_ghost"] = ghost(fresh, batch)
        if items < 100_000:
            steps["opacus_hooks"] = hooks(EmbeddingNetwork(model_config, torch.Generator().manual_seed(0)), batch)
        times = interleaved(steps, repeats=3 if items == 100_000 else 10)
        row = {"items": items, "events": EVENTS, "dim": DIM, "trials": TRIALS,
               **{f"{k}_ms": v for k, v in times.items()},
               **{f"{k}_ratio": v / times["plain"] for k, v in times.items() if k != "plain"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "round_cost.json"
    out.write_text(json.dumps({"cpu_time_per_round": rows}, indent=2))
    print(f"{'items':>8} {'plain':>9} {'clipped':>16} {'DP (with noise)':>18} {'ghost':>8} {'hooks':>8}")
    for r in rows:
        hooks_ratio = f"{r['opacus_hooks_ratio']:.1f}x" if "opacus_hooks_ratio" in r else "skipped"
        print(f"{r['items']:>8} {r['plain_ms']:>7.2f}ms {r['attune_clipped_ms']:>8.2f}ms "
              f"({r['attune_clipped_ratio']:.2f}x) {r['attune_dp_ms']:>9.2f}ms ({r['attune_dp_ratio']:.1f}x) "
              f"{r['opacus_ghost_ratio']:>7.1f}x {hooks_ratio:>8}")


if __name__ == "__main__":
    main()
