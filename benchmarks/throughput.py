"""Client updates per second on MovieLens-100K (943 devices, DP on, one round of every device).

Measured in one run, same local training for every mode (the `attune simulate` defaults:
1 user epoch and 4 global epochs, full batch, dim 4, 1 negative, noise multiplier 4.51 = epsilon 8
over 10 rounds):

- fast: ``--backend fast`` (one round, every device; evaluation included);
- flower: the real ServerApp and ClientApps in Flower's simulation engine (Ray); the time between
  the end of round 1 and the end of round 2, so Ray's start is not counted;
- stock: what a Flower user writes from Flower's Opacus example: per client and round a fresh
  model, optimizer, DataLoader and ``PrivacyEngine().make_private`` (per-sample hooks), then the
  same number of steps (timed on the first 100 devices);
- plain: the fast backend's loop without DP (the same local steps, no clipping or noise);
- pfl: with ``--pfl-python`` (an interpreter with ``pfl`` installed), benchmarks/pfl_throughput.py
  in a subprocess: pfl-research's simulation of the same local steps (user-level DP only).

Prints a table and writes benchmarks/results/throughput.json.

    .venv/bin/python benchmarks/throughput.py --data ../shared/datasets/ml-100k
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from attune.client.training import sample_batch
from attune.server.config import ServerConfig
from attune.shared.config import TrainConfig
from attune.shared.loss import per_example_loss
from attune.shared.model import ModelConfig, Personalization
from attune.simulations.datasets import load_movielens
from attune.simulations.evaluation import leave_one_out
from attune.simulations.fast import device_datasets, simulate_fast
from attune.simulations.runner import DataSource, SimulationConfig, simulate

warnings.filterwarnings("ignore")
TRAIN = TrainConfig(local_epochs=4.0, user_epochs=1.0, sample_rate=1.0, lr=6.0, user_lr=3.0, negatives=1,
                    noise_multiplier=4.51171875, max_grad_norm=1.0, joint_user=False)
STOCK_DEVICES = 100


def server(num_items: int, rounds: int, private: bool = True) -> ServerConfig:
    return ServerConfig(rounds=rounds, clients_per_round=0, min_clients=1, server_lr=10.0, seed=0,
                        noise_seed=0, model=ModelConfig(num_items=num_items, dim=4, use_context=False),
                        train=replace(TRAIN, private=private))


def fast_rate(log, split, private: bool) -> float:
    warm_up = replace(server(log.num_items, 1, private), clients_per_round=20)
    simulate_fast(log, split, warm_up, min_events=1, rank_fit=False)  # imports and first calls
    started = time.perf_counter()
    simulate_fast(log, split, server(log.num_items, 1, private), min_events=1, rank_fit=False)
    return log.num_users / (time.perf_counter() - started)


def flower_rate(data: Path) -> float:
    ends: list[float] = []
    training_only = replace(server(2, 2), fraction_evaluate=0.0)
    config = SimulationConfig(DataSource("movielens", path=data), training_only, Path(tempfile.mkdtemp()),
                              min_events=1, backend="flower")
    simulate(config, on_round=lambda _: ends.append(time.perf_counter()))
    return 943 / (ends[1] - ends[0])


def stock_rate(log, split) -> float:
    """Flower's Opacus example pattern, on the same examples and steps."""
    from opacus import PrivacyEngine

    datasets = device_datasets(log, split, use_context=False)
    g = torch.Generator().manual_seed(0)
    started = 0.0
    for user in range(STOCK_DEVICES + 1):  # the first client is a warm-up
        if user == 1:
            started = time.perf_counter()
        data = datasets[user]
        model = Personalization(ModelConfig(num_items=log.num_items, dim=4, use_context=False))
        before = {k: v.clone() for k, v in model.global_state().items()}
        batch = sample_batch(data, 1.0, TRAIN.negatives, log.num_items, g)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(batch.items, batch.labels, batch.weights), batch_size=len(data))
        optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN.lr)
        module, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=TRAIN.noise_multiplier, max_grad_norm=TRAIN.max_grad_norm)
        for _ in range(TRAIN.steps_per_round):
            for items, labels, weights in loader:
                optimizer.zero_grad()
                logits = module(items)
                per_example_loss(logits, type(batch)(items, labels, weights, None), "bce").mean().backward()
                optimizer.step()
        update = {k: v - before[k] for k, v in model.global_state().items()}  # what a client returns
        assert set(update) == set(before)
    return STOCK_DEVICES / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/ml-100k"))
    parser.add_argument("--skip-flower", action="store_true", help="skip the Ray run (about 2 min)")
    parser.add_argument("--pfl-python", type=Path, help="a Python with pfl installed: also time pfl-research")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log = load_movielens(args.data)
    split = leave_one_out(log, seed=0)
    rates = {"fast": fast_rate(log, split, private=True), "plain": fast_rate(log, split, private=False),
             "stock_opacus_per_client": stock_rate(log, split)}
    if not args.skip_flower:
        rates["flower_simulation"] = flower_rate(args.data)
    if args.pfl_python is not None:
        here = Path(__file__).parent
        subprocess.run([str(args.pfl_python), str(here / "pfl_throughput.py"), "--data", str(args.data)],
                       check=True, capture_output=True)
        rates["pfl_research"] = json.loads((here / "results" / "pfl_throughput.json").read_text())[
            "pfl_updates_per_s"]
    result = {
        "dataset": "movielens-100k", "devices": log.num_users, "steps_per_round": TRAIN.steps_per_round,
        "client_updates_per_second": rates,
        "fast_vs_stock": rates["fast"] / rates["stock_opacus_per_client"],
        "plain_vs_fast": rates["plain"] / rates["fast"],
        "fast_vs_flower": (rates["fast"] / rates["flower_simulation"]) if "flower_simulation" in rates
        else None,
        "fast_vs_pfl": (rates["fast"] / rates["pfl_research"]) if "pfl_research" in rates else None,
    }
    for name, rate in rates.items():
        print(f"{name:>26}: {rate:8.1f} client updates/s")
    print(f"fast / stock = {result['fast_vs_stock']:.1f}x (target >= 20x); "
          f"plain / fast = {result['plain_vs_fast']:.2f}x (target <= 2x)")
    out = Path(__file__).parent / "results" / "throughput.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
