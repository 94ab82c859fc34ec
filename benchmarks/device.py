"""Device-side costs: ranking latency, cold start of a device round, peak memory of a local round.

    .venv/bin/python benchmarks/device.py

Prints a table and writes benchmarks/results/device.json. Cold start runs in fresh processes, as
Flower's Deployment Engine starts a new ClientApp process for every message.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLD_START = """
import time, sys
t0 = time.perf_counter()
from attune.client.personalizer import Personalizer
from attune.shared.model import ModelConfig
t1 = time.perf_counter()
device = Personalizer(sys.argv[1], model=ModelConfig(num_items=4096, dim=32))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""

LOCAL_ROUND = """
import resource, sys, time, torch
torch.set_num_threads(1)
from attune.client.personalizer import Personalizer, PrivacyConfig
from attune.shared.config import TrainConfig
from attune.shared.events import Event
from attune.shared.model import ModelConfig
import attune.shared.dp  # noqa: F401  (Opacus's import is not part of the round, in both modes)
private = sys.argv[2] == "dp"
device = Personalizer(sys.argv[1], model=ModelConfig(num_items=100_000, dim=32),
                      privacy=PrivacyConfig(allow_non_private=True, epsilon_budget=1e9), seed=0)
now = time.time()
device.record_many(Event(f"i{k}", "click", now - 5000 + k) for k in range(2000))
data = device.local_data()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
config = TrainConfig(sample_rate=0.125, local_epochs=1, user_epochs=1, private=private)
from attune.client.training import train_round
train_round(device._model, data, config, device.ledger, torch.Generator().manual_seed(0))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024, after / 1024)
"""


def rank_latency() -> dict:
    import torch

    torch.set_num_threads(1)
    from attune.client.personalizer import Personalizer
    from attune.shared.model import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        device = Personalizer(f"{tmp}/d.sqlite", model=ModelConfig(num_items=100_000, dim=32))
        candidates = [f"item-{k}" for k in range(1000)]
        for _ in range(20):
            device.rank(candidates)
        times = []
        for _ in range(200):
            start = time.perf_counter()
            device.rank(candidates)
            times.append((time.perf_counter() - start) * 1000)
        device.close()
    return {"candidates": 1000, "median_ms": statistics.median(times),
            "p95_ms": sorted(times)[int(0.95 * len(times))]}


def cold_start() -> dict:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(5):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", COLD_START, f"{tmp}/d{k}.sqlite"],
                                 capture_output=True, text=True, check=True).stdout.split()
            runs.append({"total_s": time.perf_counter() - start, "imports_s": float(out[0]),
                         "open_store_and_model_s": float(out[1])})
    return {"median_total_s": statistics.median(r["total_s"] for r in runs),
            "median_imports_s": statistics.median(r["imports_s"] for r in runs),
            "median_open_s": statistics.median(r["open_store_and_model_s"] for r in runs)}


def round_memory() -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("plain", "dp"):
            out = subprocess.run([sys.executable, "-c", LOCAL_ROUND, f"{tmp}/{mode}.sqlite", mode],
                                 capture_output=True, text=True, check=True).stdout.split()
            result[f"{mode}_round_peak_increase_mb"] = float(out[0])
            result[f"{mode}_process_peak_mb"] = float(out[1])
    result["ratio"] = result["dp_round_peak_increase_mb"] / max(result["plain_round_peak_increase_mb"], 1e-9)
    return result


def main() -> None:
    report = {"rank": rank_latency(), "cold_start": cold_start(), "memory_100k_items": round_memory()}
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / "device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
