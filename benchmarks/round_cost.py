"""A device's DP round against a plain gradient step and stock Opacus, measured in one run.

For catalogs of 1k, 10k and 100k items (dim 32, 4 negatives, a device with 256 events), CPU time of:
- plain: one autograd backward pass over the 256 events (no clipping, no noise) of the same model,
  the reference: the default model, whose 4,096 most counted items have trained rows;
- Attune, clipped sum: the round's per-event clipping, integer rounding and per-device bound in
  closed form (``train_round`` with its noise shares left out);
- Attune, DP contribution: the same plus the discrete Gaussian noise share on every coordinate of
  the shared side (what a device really sends);
- Attune, count round: the run's first round, the DP histogram of the device's items over the
  whole catalog (once per run);
- Attune, DP contribution of a model with a row for every item (``trained_items=0``), what the
  round cost before rows were selected;
- Opacus ghost clipping and Opacus per-sample hooks computing the clipped sum of the row-per-item
  model (hooks are skipped at 100k items, where they build a 3.3 GB per-sample tensor).
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
from attune.shared.config import RoundTask, preset
from attune.shared.loss import Batch, per_example_loss
from attune.shared.mechanism import contribution_dim
from attune.shared.model import EmbeddingNetwork, ModelConfig, shared_model
from attune.shared.randomness import Stream
from attune.shared.selection import select

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
    """The default model with its rows selected by a Zipf count, a device's 256 events (mostly on
    items with rows, as popular items are), and the batch of the plain step."""
    g = torch.Generator().manual_seed(0)
    model_config = ModelConfig(num_items=items, dim=DIM, use_context=False)
    shared = shared_model(model_config)
    counts = 1000.0 / torch.arange(1, items + 1)
    state = shared.adopt(shared.init_state(g), select(counts, model_config.rows, min_count=0.0, negatives=NEGATIVES))
    popular = torch.distributions.Categorical(probs=counts / counts.sum())
    data = LocalData(popular.sample((EVENTS,)), torch.ones(EVENTS), None)
    pool = shared.negative_pool(state)
    negatives = pool[torch.randint(0, len(pool), (EVENTS, NEGATIVES), generator=g)]
    columns = torch.cat([data.items.unsqueeze(1), negatives], 1)
    labels = torch.zeros(columns.shape)
    labels[:, 0] = 1
    return model_config, state, data, Batch(columns, labels, data.weights, None)


def plain(model_config, state, batch):
    shared = shared_model(model_config)
    params = {name: state[name].clone().requires_grad_(True) for name in shared.layout.names}
    user = torch.randn(1, DIM).expand(EVENTS, DIM)

    def step():
        for p in params.values():
            p.grad = None
        logits = shared.score({**state, **params}, user, batch.items)
        per_example_loss(logits, batch, "bce").sum().backward()

    return step


def attune(model_config, state, data, shares: bool, task: RoundTask = RoundTask.TRAIN):
    config = preset("distributed", noise_multiplier=1.0, min_survivors=100, negatives=NEGATIVES, task=task)
    user = torch.randn(1, DIM, generator=torch.Generator().manual_seed(1))
    cohort = Cohort.of([data])

    def step():
        train_round(state, model_config, user, cohort, config, [Stream.seeded_from(0)], [False], shares=shares)

    return step


def every_row(items: int, data: LocalData):
    """The DP round of the model with a row for every item (no count, no selection)."""
    model_config = ModelConfig(num_items=items, dim=DIM, use_context=False, trained_items=0)
    state = shared_model(model_config).init_state(torch.Generator().manual_seed(0))
    return attune(model_config, state, data, True)


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
        model_config, state, data, batch = setup(items)
        steps = {"plain": plain(model_config, state, batch), "attune_clipped": attune(model_config, state, data, False),
                 "attune_dp": attune(model_config, state, data, True),
                 "attune_count": attune(model_config, state, data, True, RoundTask.COUNT),
                 "attune_dp_every_row": every_row(items, data)}
        full = ModelConfig(num_items=items, dim=DIM, use_context=False, trained_items=0)
        full_batch = Batch(torch.cat([data.items.unsqueeze(1), batch.items[:, 1:]], 1), batch.labels, data.weights,
                           None)
        steps["opacus_ghost"] = ghost(EmbeddingNetwork(full, generator=torch.Generator().manual_seed(0)), full_batch)
        if items < 100_000:
            steps["opacus_hooks"] = hooks(EmbeddingNetwork(full, torch.Generator().manual_seed(0)), full_batch)
        times = interleaved(steps, repeats=3 if items == 100_000 else 10)
        row = {"items": items, "events": EVENTS, "dim": DIM, "trials": TRIALS, "trained_rows": model_config.rows,
               "reply_bytes": 8 * contribution_dim(model_config),
               "count_reply_bytes": 8 * contribution_dim(model_config, RoundTask.COUNT),
               **{f"{k}_ms": v for k, v in times.items()},
               **{f"{k}_ratio": v / times["plain"] for k, v in times.items() if k != "plain"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "round_cost.json"
    out.write_text(json.dumps({"cpu_time_per_round": rows}, indent=2))
    print(f"{'items':>8} {'plain':>9} {'clipped':>16} {'DP (with noise)':>18} {'count round':>18} "
          f"{'every row':>10} {'ghost':>8} {'hooks':>8}")
    for r in rows:
        hooks_ratio = f"{r['opacus_hooks_ratio']:.1f}x" if "opacus_hooks_ratio" in r else "skipped"
        print(f"{r['items']:>8} {r['plain_ms']:>7.2f}ms {r['attune_clipped_ms']:>8.2f}ms "
              f"({r['attune_clipped_ratio']:.2f}x) {r['attune_dp_ms']:>9.2f}ms ({r['attune_dp_ratio']:.1f}x) "
              f"{r['attune_count_ms']:>9.2f}ms ({r['attune_count_ratio']:.1f}x) "
              f"{r['attune_dp_every_row_ratio']:>9.1f}x "
              f"{r['opacus_ghost_ratio']:>7.1f}x {hooks_ratio:>8}")


if __name__ == "__main__":
    main()
