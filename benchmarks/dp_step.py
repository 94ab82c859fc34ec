"""DP local training step vs the plain step, and stock Opacus modes, measured in one run.

For catalogs of 1k, 10k and 100k items (dim 32, batch 256, 4 negatives, user vector and context
encoder trained too), CPU time per step of: plain SGD; Attune's closed-form DP step (Opacus's
optimizer adds the noise); Opacus ghost clipping; Opacus per-sample hooks (skipped at 100k
items, where it builds a 3.3 GB batch x items x dim tensor per step). Prints a table and writes
benchmarks/results/dp_step.json. Ratios are against plain, measured in the same process.

    .venv/bin/python benchmarks/dp_step.py
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer

from attune.client.training import lazy_noise
from attune.shared.config import TrainConfig
from attune.shared.dp import clipped_backward, make_dp_optimizer, sparse_tables
from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import ModelConfig, Personalization

warnings.filterwarnings("ignore")
BATCH, DIM, NEGATIVES = 256, 32, 4
ROUND = 10  # steps per local round (lazy noise is drawn in full once per round)
TRIALS = 15


def make_batch(items: int, g: torch.Generator) -> Batch:
    chosen = torch.randint(0, items, (BATCH, NEGATIVES + 1), generator=g)
    labels = torch.zeros(BATCH, NEGATIVES + 1)
    labels[:, 0] = 1
    return Batch(chosen, labels, torch.ones(BATCH), torch.randn(BATCH, 9, generator=g))


def timed(step, repeats: int) -> float:
    step()  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        step()
    return (time.process_time() - start) / repeats * 1000


def interleaved(steps: dict, repeats: int, trials: int = TRIALS) -> dict[str, float]:
    """Median ms per step of each mode over ``trials`` rounds that time every mode in turn, so a
    slow spell of this shared machine hits all modes alike."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(trials):
        for name, step in steps.items():
            samples[name].append(timed(step, repeats))
    return {name: statistics.median(values) for name, values in samples.items()}


def plain_step(model: Personalization, batch: Batch):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        per_example_loss(model(batch.items, batch.context), batch, "bce").mean().backward()
        opt.step()

    return step


def plain_sparse_step(model: Personalization, batch: Batch):
    """Plain SGD with sparse embedding gradients: shown beside, not the reference."""
    sparse_tables(model, True)
    return plain_step(model, batch)


def attune_step(model: Personalization, batch: Batch, lazy: bool):
    """One DP step; with lazy noise, every ROUND-th step also draws the pending noise of the whole
    table, as at the end of a local round, so the cost of that draw is included."""
    params = list(model.parameters())
    tables = [model.item_embedding.weight, model.item_bias.weight] if lazy else None
    sparse_tables(model, lazy)
    opt = make_dp_optimizer([{"params": params, "lr": 0.1}], noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=BATCH, lazy_params=tables)
    count = [0]

    def step():
        if lazy:
            opt.materialize_rows(batch.items)
        opt.zero_grad(set_to_none=True)
        clipped_backward(model, batch, "bce", 1.0)
        opt.step()
        count[0] += 1
        if lazy and count[0] % ROUND == 0:
            opt.materialize_all()

    return step


class ExampleBCE(torch.nn.Module):
    """BCE summed over an example's columns; Opacus's ghost wrapper sets ``reduction``."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1)
        return per if self.reduction == "none" else per.mean()


def ghost_step(model: Personalization, batch: Batch):
    engine = PrivacyEngine()
    data = torch.utils.data.TensorDataset(batch.items, batch.context, batch.labels)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    criterion = ExampleBCE()
    module, opt, criterion, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        criterion=criterion, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
        poisson_sampling=False)

    def step():
        opt.zero_grad()
        loss = criterion(module(batch.items, batch.context), batch.labels)
        loss.backward()
        opt.step()

    return step


def hooks_step(model: Personalization, batch: Batch):
    module = GradSampleModule(model, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(module.parameters(), lr=0.1), noise_multiplier=1.0,
                      max_grad_norm=1.0, expected_batch_size=BATCH)

    def step():
        opt.zero_grad()
        per_example_loss(module(batch.items, batch.context), batch, "bce").sum().backward()
        opt.step()

    return step


def _ratio(row: dict, key: str) -> str:
    value = row[f"{key}_ms"]
    return "skipped" if value is None else f"{value:.2f} ms ({row[f'{key}_ratio']:.2f}x)"


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CPU time per step (batch 256, dim 32; median of interleaved trials), "
                        "ratio to plain in the same run")
    columns = ("items", "plain", "plain, sparse grads", "Attune DP", "lazy noise", "eager noise",
               "Opacus ghost", "Opacus hooks")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['items']:,}", f"{row['plain_ms']:.2f} ms", _ratio(row, "plain_sparse"),
                      _ratio(row, "attune_dp"),
                      _ratio(row, "attune_dp_lazy"), _ratio(row, "attune_dp_eager"),
                      _ratio(row, "opacus_ghost"), _ratio(row, "opacus_hooks"))
    Console().print(table)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for items in (1_000, 10_000, 100_000):
        g = torch.Generator().manual_seed(0)
        base = Personalization(ModelConfig(num_items=items, dim=DIM), generator=g)
        batch = make_batch(items, g)
        repeats = 40 if items < 100_000 else 20
        row = {"items": items, "batch": BATCH, "dim": DIM, "trials": TRIALS}
        medians = interleaved({
            "plain_ms": plain_step(copy.deepcopy(base), batch),
            "plain_sparse_ms": plain_sparse_step(copy.deepcopy(base), batch),
            "attune_dp_lazy_ms": attune_step(copy.deepcopy(base), batch, lazy=True),
            "attune_dp_eager_ms": attune_step(copy.deepcopy(base), batch, lazy=False),
        }, repeats)
        row.update(medians)
        # what local training does (lazy noise for large tables)
        row["lazy_noise_used"] = lazy_noise(ModelConfig(num_items=items, dim=DIM), TrainConfig())
        row["attune_dp_ms"] = row["attune_dp_lazy_ms" if row["lazy_noise_used"] else "attune_dp_eager_ms"]
        row["opacus_ghost_ms"] = timed(ghost_step(copy.deepcopy(base), batch), max(repeats // 4, 3))
        if items <= 10_000:
            row["opacus_hooks_ms"] = timed(hooks_step(copy.deepcopy(base), batch), 3)
        else:
            row["opacus_hooks_ms"] = None
            row["opacus_hooks_note"] = "skipped: per-sample grads are batch x items x dim (3.3 GB)"
        modes = ("plain_sparse", "attune_dp", "attune_dp_lazy", "attune_dp_eager",
                 "opacus_ghost", "opacus_hooks")
        for key in modes:
            value = row[f"{key}_ms"]
            row[f"{key}_ratio"] = None if value is None else value / row["plain_ms"]
        rows.append(row)
    _print_table(rows)
    out = Path(__file__).parent / "results" / "dp_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_time_per_step": rows, "threads": 1}, indent=2))


if __name__ == "__main__":
    main()
