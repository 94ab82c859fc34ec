"""Whole runs, end to end: the in-process backend against Flower's simulation runtime, on the demo's
population (150 synthetic devices with about 150 events each), distributed DP at epsilon 8.

Measured in one run, wall time of `simulate` (devices, rounds and the final evaluation):
- fast: ``--backend fast`` as `attune simulate` runs it (the honest shares' total noise drawn once);
- fast, per-device noise: every device draws its own share, exactly what the Flower run computes;
- fast, non-private (``--mode off``): the same round without clipping or noise;
- flower: ``flwr run`` of the real ServerApp and ClientApps in Flower's simulation runtime (Ray),
  every round through hardened SecAgg+ (from the start of the SuperLink to the final evaluation);
- stock: what a Flower user writes from Flower's Opacus example, per device and round a fresh
  ``PrivacyEngine().make_private`` (per-sample hooks) computing the same clipped, noised gradient
  sum (timed on the first 30 devices, scaled to the population).

Prints a table and writes benchmarks/results/throughput.json.

    .venv/bin/python benchmarks/throughput.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine

from attune.shared.loss import Batch, per_example_loss
from attune.shared.model import EmbeddingNetwork, ModelConfig
from attune.simulations.datasets import synthetic
from attune.simulations.evaluation import leave_one_out
from attune.simulations.fast import device_cohort, subset
from attune.simulations.options import build
from attune.simulations.runner import simulate

warnings.filterwarnings("ignore")
STOCK_DEVICES = 30


def timed_run(options: dict, log) -> float:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        simulate(build({**options, "evaluations": 1}, out=Path(out)), log=log)
        return time.perf_counter() - started


def stock_seconds(log, rounds: int) -> float:  # noqa: ANN001
    """Flower's Opacus example, one device at a time: a fresh engine per device and round."""
    model_config = ModelConfig(num_items=log.num_items, dim=8, use_context=False)
    cohort = device_cohort(log, leave_one_out(log, seed=0), use_context=False)
    started = time.perf_counter()
    for device in range(STOCK_DEVICES):
        data = subset(cohort, [device]).device(0)
        model = EmbeddingNetwork(model_config, torch.Generator().manual_seed(0))
        model.user_vector.weight.requires_grad_(False)
        model.context_encoder.weight.requires_grad_(False)
        columns = torch.cat([data.items.unsqueeze(1), torch.randint(0, log.num_items, (len(data), 4))], 1)
        labels = torch.zeros(columns.shape)
        labels[:, 0] = 1
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(columns, labels), batch_size=len(data))
        module, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
        optimizer.zero_grad()
        per_example_loss(module(columns), Batch(columns, labels, data.weights, None), "bce").sum().backward()
        optimizer.step()
    return (time.perf_counter() - started) / STOCK_DEVICES * log.num_users * rounds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = synthetic(seed=0)
    base = {"rounds": args.rounds, "dim": 8}
    seconds = {
        "fast": timed_run(base, log),
        "fast_per_device_noise": timed_run({**base, "noise": "per-device"}, log),
        "fast_non_private": timed_run({**base, "mode": "off"}, log),
        "flower": timed_run({**base, "backend": "flower"}, log),
        "stock": stock_seconds(log, args.rounds),
    }
    device_rounds = log.num_users * args.rounds
    result = {"devices": log.num_users, "rounds": args.rounds, "seconds": seconds,
              "device_rounds_per_second": {k: device_rounds / v for k, v in seconds.items()},
              "fast_over_flower": seconds["flower"] / seconds["fast"],
              "per_device_noise_over_flower": seconds["flower"] / seconds["fast_per_device_noise"],
              "fast_over_stock": seconds["stock"] / seconds["fast"],
              "fast_over_non_private": seconds["fast_non_private"] / seconds["fast"]}
    print(json.dumps(result, indent=2))
    Path(__file__).parent.joinpath("results", "throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
