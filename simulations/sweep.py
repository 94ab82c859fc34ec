"""Privacy/utility sweeps: modes x algorithms x epsilon x seeds on the fast backend, one table and
one plot.

A sweep that was interrupted resumes: a cell whose ``results.json`` records the same settings is
read back instead of run again.

Each cell runs ``attune simulate --backend fast`` with each mode's preset, changing only the mode,
the algorithm, the per-device event-level epsilon (``None``: no DP, labelled so, one row per
algorithm whatever the modes) and the seed; only the final round is evaluated. ``sweep.csv`` and
``sweep.json`` hold the mean and standard deviation over seeds of each metric; ``sweep.png`` plots
HR@10 against epsilon, one line per mode and algorithm.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from attune.server.config import ServerConfig
from attune.shared.config import PrivacyMode
from attune.shared.errors import ConfigError
from attune.simulations.algorithms import algorithm
from attune.simulations.runner import DataSource, SimulationConfig, as_json, simulate

METRICS = ("hr@10", "ndcg@10", "worst_decile_hr@10", "catalog_coverage@10", "intra_list_diversity@10",
           "novelty@10", "popular_hr@10")


@dataclass(frozen=True)
class SweepConfig:
    source: DataSource
    modes: tuple[str, ...]
    algorithms: tuple[str, ...]
    epsilons: tuple[float | None, ...]
    seeds: tuple[int, ...]
    out: Path
    rounds: int | None = None  # None: each mode's preset

    def __post_init__(self) -> None:
        if not (self.modes and self.algorithms and self.epsilons and self.seeds):
            raise ConfigError("a sweep needs at least one mode, algorithm, epsilon and seed")
        for mode in self.modes:
            if mode not in (PrivacyMode.DISTRIBUTED.value, PrivacyMode.LOCAL.value):
                raise ConfigError(f"sweep modes are distributed and local (no DP is the epsilon 'none'), got {mode!r}")
        for name in self.algorithms:
            algorithm(name)

    def grid(self) -> list[tuple[str, str, float | None, int]]:
        cells = []
        for name in self.algorithms:
            for epsilon in self.epsilons:
                for mode in (self.modes if epsilon is not None else (PrivacyMode.OFF.value,)):
                    cells += [(mode, name, epsilon, seed) for seed in self.seeds]
        return cells

    def cells(self) -> int:
        return len(self.grid())


def _cell(config: SweepConfig, mode: str, name: str, epsilon: float | None, seed: int) -> dict:
    server = ServerConfig(mode=PrivacyMode(mode), seed=seed, target_epsilon=epsilon)  # None: absent
    if config.rounds is not None:
        server = replace(server, rounds=config.rounds)
    label = f"{mode}-{name}-{'nodp' if epsilon is None else f'eps{epsilon:g}'}-seed{seed}"
    out = config.out / "cells" / label
    results = _finished(out, config.source, server, name) or simulate(
        SimulationConfig(config.source, server, out, algorithm=name, evaluations=1))
    metrics = results["beyond_accuracy"] or {}
    return {"mode": mode, "algorithm": name, "epsilon": epsilon, "seed": seed,
            "hr@10": results["final"]["hr@10"], "ndcg@10": results["final"]["ndcg@10"],
            "epsilon_spent": results["privacy"]["epsilon"] or 0.0,
            "popular_hr@10": results["baseline"]["popular"]["hr@10"],
            **{k: metrics[k] for k in METRICS if k in metrics}}


# Filled in by the runner from the data and the output folder, so not part of a cell's identity.
_RUN_FILLED = {"min_devices", "noise_seed", "out_dir", "num_items"}


def _finished(out: Path, source: DataSource, server: ServerConfig, name: str) -> dict | None:
    """An earlier run's results for this cell, if it finished with these exact settings and data."""
    try:
        results = json.loads((out / "results.json").read_text())
        stored = results["config"]["server"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = as_json(server)
    stored, wanted = ({**c, "model": {k: v for k, v in c["model"].items() if k not in _RUN_FILLED}}
                      for c in (stored, wanted))
    same_data = results["config"].get("source") == source.described()
    same = same_data and results.get("algorithm") == name and all(
        stored.get(key) == value for key, value in wanted.items() if key not in _RUN_FILLED)
    return results if same else None


def run_sweep(config: SweepConfig, on_cell: Callable[[dict], None] | None = None) -> list[dict]:
    """Every cell of the grid, then the table (mean and std over seeds) and the plot."""
    cells = []
    for mode, name, epsilon, seed in config.grid():
        cell = _cell(config, mode, name, epsilon, seed)
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
    for key in dict.fromkeys((c["mode"], c["algorithm"], c["epsilon"]) for c in cells):
        group = [c for c in cells if (c["mode"], c["algorithm"], c["epsilon"]) == key]
        row: dict = {"mode": key[0], "algorithm": key[1], "epsilon": "no DP" if key[2] is None else key[2],
                     "seeds": len(group)}
        for metric in (*METRICS, "epsilon_spent"):
            values = [c[metric] for c in group if c.get(metric) is not None]
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
    fig, axis = plt.subplots(figsize=(6.5, 4))
    for mode, name in dict.fromkeys((r["mode"], r["algorithm"]) for r in rows if r["epsilon"] != "no DP"):
        mine = {r["epsilon"]: r for r in rows
                if r["algorithm"] == name and (r["mode"] == mode or r["epsilon"] == "no DP")}
        xs = [i for i, e in enumerate(ticks) if e in mine]
        axis.errorbar(xs, [mine[ticks[i]]["hr@10_mean"] for i in xs], yerr=[mine[ticks[i]]["hr@10_std"] for i in xs],
                      marker="o", capsize=3, ls="-" if mode == "distributed" else ":", label=f"{mode} {name}")
    popular = [r["popular_hr@10_mean"] for r in rows if not math.isnan(r.get("popular_hr@10_mean", math.nan))]
    if popular:
        axis.axhline(float(np.mean(popular)), ls="--", c="grey", label="most popular")
    axis.set_xticks(range(len(ticks)), [str(t) for t in ticks])
    axis.set_xlabel("per-device event-level epsilon (delta 1e-5)")
    axis.set_ylabel("HR@10")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
