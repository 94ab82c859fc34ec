"""Scale of the fast backend: 100,000 simulated devices on this machine.

Builds the synthetic population, its leave-one-out split and the devices' compact state, and
reports the memory each idle device costs (events, user vector, counters); then runs one DP
round with a cohort of 1,000 devices and evaluates all of them. Prints and writes
benchmarks/results/scale.json. Memory is the process's peak RSS growth (``resource``).

    .venv/bin/python benchmarks/scale.py --devices 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from attune.server.config import ServerConfig
from attune.shared.config import TrainConfig
from attune.shared.model import ModelConfig
from attune.simulations.datasets import synthetic
from attune.simulations.evaluation import leave_one_out
from attune.simulations.fast import device_datasets, simulate_fast


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--cohort", type=int, default=1_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_mb, started = peak_mb(), time.perf_counter()
    log = synthetic(num_users=args.devices, seed=0)
    split = leave_one_out(log, seed=0)
    data = device_datasets(log, split, use_context=False)
    built_mb, built_s = peak_mb(), time.perf_counter() - started
    state_bytes = sum(t.numel() * t.element_size() for t in (data.items, data.weights, data.offsets))
    state_bytes += args.devices * (8 * 4 + 1 + 4)  # user vector (dim 8), trained flag, rounds
    server = ServerConfig(
        rounds=1, clients_per_round=args.cohort, min_clients=1, server_lr=10.0, seed=0, noise_seed=0,
        model=ModelConfig(num_items=log.num_items, dim=8, use_context=False),
        train=TrainConfig(sample_rate=1.0, local_epochs=1, user_epochs=1, noise_multiplier=2.0))
    started = time.perf_counter()
    report = simulate_fast(log, split, server, rank_fit=False)
    round_s = time.perf_counter() - started
    result = {
        "devices": args.devices, "events": len(log), "items": log.num_items,
        "device_state_bytes_per_device": state_bytes / args.devices,
        "build_peak_rss_growth_mb": built_mb - start_mb,
        "peak_rss_mb": peak_mb(),
        "build_seconds": built_s,
        "round_seconds": round_s, "cohort": args.cohort,
        "hr@10_after_one_round": report["hr@10_personal"],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "scale.json"
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
