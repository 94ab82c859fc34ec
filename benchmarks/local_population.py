"""Where `local` mode crosses popularity as the population grows, beside `distributed`.

Synthetic logs of 1,000, 10,000 and 100,000 people (40 events each in expectation, 300 items),
each mode's preset at epsilon 8 on the fast backend, the final round evaluated. In `local` mode
the noise of the sum grows as sqrt(devices) and the signal as devices, so it needs a large
population; `distributed` adds the full noise once per round whatever the population. Prints a
table and writes benchmarks/results/local_population.json.

    .venv/bin/python benchmarks/local_population.py [--sizes 1000,10000,100000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from attune.simulations.datasets import synthetic
from attune.simulations.options import build
from attune.simulations.runner import simulate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--modes", default="local,distributed")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        log = synthetic(num_users=size, events_per_user=40, num_items=300, seed=0)
        for mode in args.modes.split(","):
            started = time.monotonic()
            with tempfile.TemporaryDirectory() as out:
                results = simulate(build({"mode": mode, "rounds": args.rounds, "evaluations": 1,
                                          "synthetic_users": size}, out=Path(out)), log=log)
            row = {"devices": size, "mode": mode, "hr@10": results["final"]["hr@10"],
                   "popular_hr@10": results["baseline"]["popular"]["hr@10"],
                   "epsilon": results["privacy"]["epsilon"], "seconds": round(time.monotonic() - started, 1)}
            row["ratio_to_popular"] = round(row["hr@10"] / row["popular_hr@10"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "local_population.json"
    out.write_text(json.dumps({"rounds": args.rounds, "epsilon": 8.0, "rows": rows}, indent=2))
    print(f"{'devices':>8} {'mode':>12} {'HR@10':>7} {'popular':>8} {'ratio':>6}")
    for row in rows:
        print(f"{row['devices']:>8} {row['mode']:>12} {row['hr@10']:>7.3f} {row['popular_hr@10']:>8.3f} "
              f"{row['ratio_to_popular']:>6.2f}")


if __name__ == "__main__":
    main()
