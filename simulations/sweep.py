"""Privacy/utility sweeps: algorithms x epsilon x seeds on the fast backend, one table and one plot.

Each cell runs ``attune simulate --backend fast`` with the same options but the algorithm, the
per-device event-level epsilon (``None``: no DP, labelled so) and the seed; only the final round
is evaluated. ``sweep.csv`` and ``sweep.json`` hold the mean and standard deviation over seeds of
each metric; ``sweep.png`` plots HR@10 against epsilon, one line per algorithm.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attune.simulations.runner import DataSource, SimulationConfig, server_config, simulate

METRICS = ("hr@10", "ndcg@10", "worst_decile_hr@10", "catalog_coverage@10", "intra_list_diversity@10",
           "novelty@10", "epsilon_max", "popular_hr@10")


@dataclass(frozen=True)
class SweepConfig:
    source: DataSource
    options: dict  # server_config keywords shared by every cell (epsilon, no_dp and seed are set per cell)
    algorithms: tuple[str, ...]
    epsilons: tuple[float | None, ...]
    seeds: tuple[int, ...]
    out: Path
    min_events: int = 5


def _cell(config: SweepConfig, algorithm: str, epsilon: float | None, seed: int) -> dict:
    server = server_config(**{**config.options, "epsilon": epsilon if epsilon is not None else 8.0,
                              "no_dp": epsilon is None, "seed": seed})
    name = f"{algorithm}-{'nodp' if epsilon is None else f'eps{epsilon:g}'}-seed{seed}"
    results = simulate(SimulationConfig(config.source, server, config.out / "cells" / name, backend="fast",
                                        min_events=config.min_events, algorithm=algorithm,
                                        evaluate_every_round=False))
    metrics = results["beyond_accuracy"]
    return {"algorithm": algorithm, "epsilon": epsilon, "seed": seed,
            "hr@10": results["final"]["hr@10"], "ndcg@10": results["final"]["ndcg@10"],
            "epsilon_max": results["privacy"]["epsilon_max"] or 0.0,
            "popular_hr@10": results["baseline"]["popular"]["hr@10"],
            **{k: metrics[k] for k in METRICS if k in metrics}}


def run_sweep(config: SweepConfig, on_cell: Callable[[dict], None] | None = None) -> list[dict]:
    """Every cell of the grid, then the table (mean and std over seeds) and the plot."""
    cells = []
    for algorithm in config.algorithms:
        for epsilon in config.epsilons:
            for seed in config.seeds:
                cell = _cell(config, algorithm, epsilon, seed)
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
    rows = summarize(cells)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "sweep.json").write_text(json.dumps({"cells": cells, "summary": rows}, indent=2))
    with (config.out / "sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, config.out / "sweep.png")
    return rows


def summarize(cells: Sequence[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((c["algorithm"], c["epsilon"]) for c in cells):
        group = [c for c in cells if (c["algorithm"], c["epsilon"]) == key]
        epsilon = "no DP" if key[1] is None else key[1]
        row: dict = {"algorithm": key[0], "epsilon": epsilon, "seeds": len(group)}
        for metric in METRICS:
            values = [c[metric] for c in group if metric in c]
            row[f"{metric}_mean"] = float(np.mean(values)) if values else math.nan
            row[f"{metric}_std"] = float(np.std(values)) if values else math.nan
        rows.append(row)
    return rows


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted({r["epsilon"] for r in rows if r["epsilon"] != "no DP"})
    ticks = [*epsilons, "no DP"]
    fig, axis = plt.subplots(figsize=(6, 3.8))
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        mine = {r["epsilon"]: r for r in rows if r["algorithm"] == algorithm}
        xs = [i for i, e in enumerate(ticks) if e in mine]
        axis.errorbar(xs, [mine[ticks[i]]["hr@10_mean"] for i in xs],
                      yerr=[mine[ticks[i]]["hr@10_std"] for i in xs], marker="o", capsize=3, label=algorithm)
    popular = [r["popular_hr@10_mean"] for r in rows if not math.isnan(r.get("popular_hr@10_mean", math.nan))]
    if popular:
        axis.axhline(float(np.mean(popular)), ls="--", c="grey", label="most popular")
    axis.set_xticks(range(len(ticks)), [str(t) for t in ticks])
    axis.set_xlabel("per-device event-level epsilon (delta 1e-5)")
    axis.set_ylabel("HR@10")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
