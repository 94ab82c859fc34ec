"""Federated evaluation on MovieLens-100K (issue 22): does the coordinator's DP estimate of HR@10
cover the exact value as often as its 95% interval says, how wide is it, and what does the
evaluation's share of the budget cost training?

Each seed is one fast-backend run (``attune simulate --dataset movielens``) at the defaults
(``distributed``, epsilon 8) with ``--eval-share SHARE``: a final evaluation round over every
device, which ranks its held-out event (``attune.shared.evaluation``). The baseline, measured in
the same run, is the same seeds without evaluation rounds (``--eval-share 0``): the training
HR@10 both reach.

    .venv/bin/python benchmarks/federated_evaluation.py [--seeds 20] [--share 0.05]

Needs MovieLens-100K beside the checkout (../shared/datasets/ml-100k). Prints a table and writes
benchmarks/results/federated_evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT.parent / "shared" / "datasets" / "ml-100k"
BASELINE_SEEDS = 3


def run(seed: int, share: float, folder: Path) -> dict:
    out = folder / f"share{share}-seed{seed}"
    command = [sys.executable, "-m", "attune.simulations.cli", "simulate", "--dataset", "movielens", "--data",
               str(MOVIELENS), "--seed", str(seed), "--eval-share", str(share), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not (MOVIELENS / "u.data").is_file():
        sys.exit(f"MovieLens-100K not found at {MOVIELENS}")
    jobs = [(seed, args.share) for seed in range(args.seeds)] + [(seed, 0.0) for seed in range(BASELINE_SEEDS)]
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(args.workers) as pool:
        done = list(pool.map(lambda job: (job, run(*job, Path(folder))), jobs))
    evaluated = [results for (seed, share), results in done if share > 0]
    baseline = [results for (seed, share), results in done if share == 0]
    rows = []
    for seed, results in enumerate(evaluated):
        federated = results["federated_evaluation"]
        rows.append({"seed": seed, "exact_hr@10": federated["exact_hr@10"], "estimate": federated["estimate"]["hr"],
                     "half_width": federated["estimate"]["hr_half_width"], "covered": federated["covered"],
                     "popular_estimate": federated["estimate"]["popular_hr"], "epsilon": results["privacy"]["epsilon"],
                     "epsilon_evaluation_alone": federated["epsilon_alone"]})
    summary = {
        "share": args.share, "seeds": args.seeds,
        "covered": sum(bool(r["covered"]) for r in rows),
        "half_width_mean": statistics.mean(r["half_width"] for r in rows),
        "half_width_max": max(r["half_width"] for r in rows),
        "epsilon_evaluation_alone": rows[0]["epsilon_evaluation_alone"],
        "epsilon_total_max": max(r["epsilon"] for r in rows),
        "training_hr@10_mean_3_seeds": statistics.mean(r["exact_hr@10"] for r in rows[:BASELINE_SEEDS]),
        "baseline_no_evaluation_hr@10_mean_3_seeds": statistics.mean(b["final"]["hr@10"] for b in baseline),
        "popular_hr@10": evaluated[0]["baseline"]["popular"]["hr@10"],
    }
    for r in rows:
        print(f"seed {r['seed']:2d}: exact {r['exact_hr@10']:.4f}  DP estimate {r['estimate']:.4f} ± "
              f"{r['half_width']:.4f}  {'covered' if r['covered'] else 'MISSED'}")
    for key, value in summary.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    target = ROOT / "benchmarks" / "results" / "federated_evaluation.json"
    target.write_text(json.dumps({"command": "benchmarks/federated_evaluation.py " + " ".join(sys.argv[1:]),
                                  "summary": summary, "runs": rows}, indent=2))
    print(f"-> {target}")


if __name__ == "__main__":
    main()
