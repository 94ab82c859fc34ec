"""End to end: the demo's settings beat popularity by a quarter under distributed DP (checked on
the in-process backend, which computes what the demo's Flower run computes), and ``flwr run`` in
Flower's simulation runtime with real SecAgg+ repeats exactly and leaves no process behind."""

import json

import pytest

from attune.simulations.cli import DEMO
from attune.simulations.federation import MARKER, marked_processes
from attune.simulations.options import build
from attune.simulations.runner import simulate


def test_the_demo_settings_beat_popularity_by_a_quarter(tmp_path):
    results = simulate(build({**DEMO, "seed": 0, "backend": "fast", "noise": "per-device"}, out=tmp_path))
    assert results["privacy"]["mode"] == "distributed" and results["privacy"]["epsilon"] <= 8.0 + 1e-6
    assert results["final"]["hr@10"] >= 1.25 * results["baseline"]["popular"]["hr@10"]


@pytest.mark.slow
def test_a_flower_run_with_secure_aggregation_repeats_exactly(tmp_path):
    options = {"rounds": 3, "seed": 3, "backend": "flower", "synthetic_users": 20, "dim": 8, "evaluations": 1}
    first = simulate(build(options, out=tmp_path / "a"))
    again = simulate(build(options, out=tmp_path / "b"))
    assert first["privacy"]["trust"]["secure_aggregation"].startswith("flower-secagg+")
    assert [r["contributed"] for r in first["rounds"]] == [20, 20, 20]  # the count, then two training rounds
    assert first["final"] == again["final"] and first["privacy"]["epsilon"] == again["privacy"]["epsilon"]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["final"] == again["final"]
    assert len(list((tmp_path / "a" / "checkpoints").glob("global_round_*.pt"))) == 3
    for run in ("a", "b"):  # the SuperLink and everything Flower started for it stopped with the run
        assert marked_processes(f"{MARKER}={(tmp_path / run / 'flower').resolve()}") == []
