"""Device-side costs: ranking latency, cold start of a device round, and the peak memory and CPU
time of one device round (private against not).

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
from attune import ModelConfig, Personalizer
t1 = time.perf_counter()
device = Personalizer(sys.argv[1], model=ModelConfig(num_items=4096, dim=32))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""

DEVICE_ROUND = """
import resource, sys, time, torch
torch.set_num_threads(1)
from attune import Event, ModelConfig, Personalizer, PrivacyConfig
from attune.shared.config import preset
from attune.shared.model import shared_model
from attune.shared.wire import RoundRequest
import attune.shared.accounting as accounting
accounting.epsilon_of([accounting.Entry(accounting.Gaussian(1.0))], 1e-5)  # Opacus's import is not part of the round
mode = sys.argv[2]
model = ModelConfig(num_items=100_000, dim=32, use_context=False)
device = Personalizer(sys.argv[1], model=model, privacy=PrivacyConfig(allow_non_private=True, epsilon_budget=999),
                      simulation_seed=(0, 0))
device.grant_consent("benchmark")
now = time.time()
device.record_many(Event(f"i{k}", "click", now - 5000 + k) for k in range(2000))
state = shared_model(model).init_state(torch.Generator().manual_seed(0))
config = preset(mode, min_survivors=100) if mode != "off" else preset("off")
request = RoundRequest("bench", 1, model, config, state)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()
outcome = device.contribute(request)
seconds = time.process_time() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert outcome.vector is not None
print((after - before) / 1024, after / 1024, seconds)
"""


def rank_latency() -> dict:
    import torch

    torch.set_num_threads(1)
    from attune import ModelConfig, Personalizer

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
    """Peak memory and CPU time of one device round (2,000 events, 100k items, dim 32), private
    (distributed) against non-private, each in a fresh process."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("off", "distributed"):
            out = subprocess.run([sys.executable, "-c", DEVICE_ROUND, f"{tmp}/{mode}.sqlite", mode],
                                 capture_output=True, text=True, check=True).stdout.split()
            result[f"{mode}_round_peak_increase_mb"] = float(out[0])
            result[f"{mode}_process_peak_mb"] = float(out[1])
            result[f"{mode}_round_cpu_s"] = float(out[2])
    result["memory_ratio"] = result["distributed_round_peak_increase_mb"] / max(
        result["off_round_peak_increase_mb"], 1e-9)
    return result


def main() -> None:
    report = {"rank": rank_latency(), "cold_start": cold_start(), "memory_100k_items": round_memory()}
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / "device.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
