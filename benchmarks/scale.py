"""Scale of the fast backend: 100,000 simulated devices on this machine.

Builds the synthetic population (40 events each in expectation, 300 items), its leave-one-out
split and the devices' compact state, and reports the memory each idle device costs (events, user
vector, counters); then runs one distributed-DP round with an expected cohort of 1,000 devices and
evaluates all 100,000 of them. The round is each device's only planned participation, so it is
calibrated to epsilon 1 (the noise that would spend epsilon 8 in one round is under the devices'
default floor, and they would refuse it). Prints and writes benchmarks/results/scale.json. Memory is the
process's peak RSS growth (``resource``).

    .venv/bin/python benchmarks/scale.py --devices 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from attune.simulations.datasets import synthetic
from attune.simulations.evaluation import leave_one_out
from attune.simulations.fast import device_cohort
from attune.simulations.options import build
from attune.simulations.runner import simulate


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--cohort", type=int, default=1_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_mb, started = peak_mb(), time.perf_counter()
    log = synthetic(num_users=args.devices, events_per_user=40, num_items=300, seed=0)
    cohort = device_cohort(log, leave_one_out(log, seed=0), use_context=False)
    built_mb, built_s = peak_mb(), time.perf_counter() - started
    dim = 16
    state_bytes = sum(t.numel() * t.element_size() for t in (cohort.items, cohort.weights, cohort.offsets))
    state_bytes += args.devices * (dim * 4 + 1 + 8)  # user vector, started flag, rounds joined
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        results = simulate(build({"rounds": 1, "devices_per_round": args.cohort, "dim": dim, "evaluations": 1,
                                  "target_epsilon": 1.0, "synthetic_users": args.devices}, out=Path(out)), log=log)
    round_s = time.perf_counter() - started
    result = {
        "devices": args.devices, "events": len(log), "items": log.num_items,
        "device_state_bytes_per_device": state_bytes / args.devices,
        "build_peak_rss_growth_mb": built_mb - start_mb,
        "peak_rss_mb": peak_mb(),
        "build_seconds": built_s,
        "round_and_evaluation_seconds": round_s, "round_seconds": results["rounds"][0]["seconds"],
        "expected_cohort": args.cohort,
        "devices_in_the_round": results["rounds"][0]["contributed"],
        "hr@10_after_one_round": results["final"]["hr@10"],
    }
    print(json.dumps(result, indent=2))
    Path(__file__).parent.joinpath("results", "scale.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
