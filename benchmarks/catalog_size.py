"""Utility under DP as the catalog grows, and what a device pays for it.

Utility: the fast backend (``attune simulate``, each mode's preset) on synthetic logs of 1,000
people with 30 to 150 events each, Zipf 1 popularity and taste 3.5, over 1k, 10k and 100k items
(and 10k items whose catalog lists 20 categories), and on MovieLens-100K (with its genres) when it
is beside the checkout: HR@10 at epsilon 8 and 2 (``distributed``),
without DP (the preset model, and the model with a trained row for every item: the stronger one
is the no-DP reference), and most popular; each the mean over seeds 0, 1 and 2. The headroom kept
is ``(dp - popular) / (no_dp - popular)``.

Device: per catalog (and 1M items), the reply of one training round and of one count round in
bytes (int64 units, what the secure sum carries; a catalog over 131,072 items is counted a slice
per round, ``count_rounds`` of them), and the peak memory of one device round at 1M
items and dim 16 against the float32 size of the model it trains and of a model with a row for
every item: the rise of the resident size over the round in a fresh process (``cold``: what a
Deployment Engine ClientApp process pays, first use of every code path included), and after a
first round of a 1k-item model with glibc returning freed memory at once (``warm``: what the
round's own data costs, storing a new selection included), and for training after a first round
of the same model (``steady``: every training round but a run's first, whose selection is stored
already). A round frees the device's cached model (4.1 MB) as it adopts the received one, so its
own peak is at most the rise plus that (``*_round_peak_bound_mb``).

    .venv/bin/python benchmarks/catalog_size.py [--quick] [--shapes SHAPE ...] [--device-only]

``--quick`` runs one seed; ``--shapes`` the catalogs named (``synthetic-10000-tags20``: the 10k
catalog listing 20 item categories, which devices rank with; MovieLens ranks with its genres);
``--device-only`` measures the device alone. Rows not run keep their stored values. Prints
tables and writes benchmarks/results/catalog_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = ROOT.parent / "shared" / "datasets" / "ml-100k"
SHAPE = ["--synthetic-users", "1000", "--synthetic-zipf", "1.0", "--synthetic-events", "30-150",
         "--synthetic-taste", "3.5"]
SETTINGS = {"dp8": ["--epsilon", "8"], "dp2": ["--epsilon", "2"], "no_dp": ["--mode", "off"],
            "no_dp_every_row": ["--mode", "off", "--trained-items", "0"]}

MEMORY = """
import re, sys, time, torch
torch.set_num_threads(1)
from attune import Event, ModelConfig, Personalizer, PrivacyConfig
from attune.shared.config import RoundTask, preset
from attune.shared.model import shared_model
from attune.shared.selection import select
from attune.shared.wire import RoundRequest
import attune.shared.accounting as accounting
accounting.epsilon_of([accounting.Entry(accounting.Gaussian(1.0))], 1e-5)  # Opacus's import is not part of the round
task = RoundTask(sys.argv[2])

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def round_at(items, path, device, number=1):
    model = ModelConfig(num_items=items, dim=16)
    person = Personalizer(path, model=model, privacy=PrivacyConfig(epsilon_budget=999), simulation_seed=(0, device))
    person.grant_consent("benchmark")
    person.record_many(Event(f"i{k * 7 % items}", "click", time.time() - 5000 + k) for k in range(500))
    shared = shared_model(model)
    counts = 1000.0 / torch.arange(1, items + 1)
    state = shared.adopt(shared.init_state(torch.Generator().manual_seed(0)),
                         select(counts, model.rows, min_count=0.0, negatives=4))
    config = preset("distributed", min_survivors=100, noise_multiplier=2.0, user_noise_multiplier=2.0, task=task)
    request = RoundRequest("bench", number, model, config, state)
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current size
    before = kib("VmRSS")
    outcome = person.contribute(request)
    assert outcome.vector is not None
    return (kib("VmHWM") - before) / 1024, sum(4 * value.numel() for value in state.values()) / 2**20

if sys.argv[3] == "warm":  # a round of a 1k-item model first: code paths and libraries are initialised
    round_at(1000, sys.argv[1] + ".warm", 1)
if sys.argv[3] == "steady":  # a first round of the same model: its prior is stored, as after any first round
    round_at(1_000_000, sys.argv[1], 0)
peak, size = round_at(1_000_000, sys.argv[1], 0, number=2)
print(peak, size, 4 * 1_000_000 * 17 / 2**20)
"""


def data_options(shape: str) -> list[str]:
    """``synthetic-ITEMS`` or ``synthetic-ITEMS-tagsN`` (a catalog listing N categories), or MovieLens."""
    if shape == "movielens-100k":
        return ["--dataset", "movielens", "--data", str(MOVIELENS)]
    items, _, tags = shape.removeprefix("synthetic-").partition("-tags")
    return ["--dataset", "synthetic", *SHAPE, "--synthetic-items", items, *(["--synthetic-tags", tags] if tags else [])]


def simulate(shape: str, setting: str, seed: int, out: Path) -> float | tuple[float, float]:
    data = data_options(shape)
    folder = out / f"{shape}-{setting}-{seed}"
    if not (folder / "results.json").exists():
        subprocess.run([sys.executable, "-m", "attune.simulations.cli", "simulate", *data, *SETTINGS[setting],
                        "--seed", str(seed), "--out", str(folder)], check=True, capture_output=True, cwd=ROOT)
    results = json.loads((folder / "results.json").read_text())
    return results["final"]["hr@10"], results["baseline"]["popular"]["hr@10"]


SHAPES = ["synthetic-1000", "synthetic-10000", "synthetic-100000", "synthetic-10000-tags20", "movielens-100k"]


def utility(seeds: list[int], out: Path, shapes: list[str]) -> list[dict]:
    if not (MOVIELENS / "u.data").is_file():
        shapes = [shape for shape in shapes if shape != "movielens-100k"]
    cells = [(shape, setting, seed) for shape in shapes for setting in SETTINGS for seed in seeds]
    with ThreadPoolExecutor(2) as pool:  # two simulations at once on this 2-core machine
        done = dict(zip(cells, pool.map(lambda cell: simulate(*cell, out), cells), strict=True))
    rows = []
    for shape in shapes:
        mean = {setting: statistics.mean(done[shape, setting, s][0] for s in seeds) for setting in SETTINGS}
        popular = statistics.mean(done[shape, "dp8", s][1] for s in seeds)
        no_dp = max(mean["no_dp"], mean["no_dp_every_row"])
        rows.append({"shape": shape, "seeds": seeds, **mean, "popular": popular, "no_dp_reference": no_dp,
                     "headroom_kept_eps8": (mean["dp8"] - popular) / (no_dp - popular),
                     "headroom_kept_eps2": (mean["dp2"] - popular) / (no_dp - popular),
                     "per_seed": {setting: [done[shape, setting, s][0] for s in seeds] for setting in SETTINGS},
                     "popular_per_seed": [done[shape, "dp8", s][1] for s in seeds]})
    return rows


def device() -> dict:
    from attune.shared.config import RoundTask
    from attune.shared.mechanism import contribution_dim
    from attune.shared.model import ModelConfig
    from attune.shared.selection import count_slices

    replies = []
    for items in (1_000, 10_000, 100_000, 1_000_000):
        model = ModelConfig(num_items=items, dim=16)
        replies.append({"items": items, "dim": 16, "trained_rows": model.rows,
                        "training_reply_bytes": 8 * contribution_dim(model),
                        "count_reply_bytes": 8 * contribution_dim(model, RoundTask.COUNT),  # one slice's
                        "count_rounds": count_slices(items),
                        "every_row_reply_bytes": 8 * contribution_dim(ModelConfig(num_items=items, dim=16,
                                                                                  trained_items=0))})
    memory: dict[str, dict[str, float]] = {}
    # warm: glibc returns freed memory at once, so the resident size follows what the round holds
    returned = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("train", "count"):
            for start in ("cold", "warm", "steady") if task == "train" else ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", MEMORY, f"{tmp}/{task}-{start}.sqlite", task, start],
                                     check=True, capture_output=True, text=True,
                                     env=None if start == "cold" else returned).stdout.split()
                memory.setdefault(task, {"model_float32_mb": float(out[1]),
                                         "every_row_model_float32_mb": float(out[2])})
                memory[task][f"{start}_peak_increase_mb"] = float(out[0])
                if start != "cold":  # the cached model it frees (4.1 MB) may have paid for part of the rise
                    memory[task][f"{start}_round_peak_bound_mb"] = float(out[0]) + float(out[1])
    return {"replies": replies, "memory_1m_items_dim16": memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument("--device-only", action="store_true", help="the device's costs alone")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=SHAPES,
                        help="the catalogs to simulate (the others keep their stored rows)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "catalog_size")
    args = parser.parse_args()
    out = Path(__file__).parent / "results" / "catalog_size.json"
    stored = json.loads(out.read_text())["utility"] if out.is_file() else []
    fresh = [] if args.device_only else utility([0] if args.quick else [0, 1, 2], args.runs, args.shapes)
    ran = {row["shape"] for row in fresh}
    order = {shape: i for i, shape in enumerate(SHAPES)}
    rows = sorted([row for row in stored if row["shape"] not in ran] + fresh, key=lambda row: order[row["shape"]])
    report = {"utility": rows, "device": device()}
    out.write_text(json.dumps(report, indent=2))
    print(f"{'catalog':>18} {'eps 8':>7} {'eps 2':>7} {'no DP':>7} {'popular':>8} {'kept@8':>7} {'kept@2':>7}")
    for r in report["utility"]:
        print(f"{r['shape']:>18} {r['dp8']:>7.3f} {r['dp2']:>7.3f} {r['no_dp_reference']:>7.3f} {r['popular']:>8.3f} "
              f"{r['headroom_kept_eps8']:>7.2f} {r['headroom_kept_eps2']:>7.2f}")
    for r in report["device"]["replies"]:
        print(f"{r['items']:>9} items: training reply {r['training_reply_bytes'] / 1e6:.2f} MB, count round "
              f"{r['count_reply_bytes'] / 1e6:.2f} MB (x{r['count_rounds']}) "
              f"(a row for every item: {r['every_row_reply_bytes'] / 1e6:.1f} MB)")
    for task, m in report["device"]["memory_1m_items_dim16"].items():
        steady = (f", +{m['steady_peak_increase_mb']:.1f} MB after a first round of the same model (its own "
                  f"peak at most {m['steady_round_peak_bound_mb']:.1f} MB)" if "steady_peak_increase_mb" in m else "")
        print(f"1M items, dim 16, {task} round: peak +{m['cold_peak_increase_mb']:.1f} MB in a fresh process, "
              f"+{m['warm_peak_increase_mb']:.1f} MB after a first round of a small model (its own peak at most "
              f"{m['warm_round_peak_bound_mb']:.1f} MB){steady}; model {m['model_float32_mb']:.1f} MB float32 "
              f"({m['every_row_model_float32_mb']:.1f} MB with a row for every item)")

if __name__ == "__main__":
    main()
