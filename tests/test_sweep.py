"""The sweep runs every cell on the fast backend and summarizes it over seeds."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from attune.simulations.cli import cli


def test_sweep_writes_a_table_over_seeds_and_a_plot(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", "--modes", "distributed,local", "--algorithms",
                                      "global,partial-local", "--epsilons", "4,none", "--seeds", "0,1", "--rounds",
                                      "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "sweep.json").read_text())
    # per algorithm: 2 modes x epsilon 4, and one no-DP row, each over 2 seeds
    assert len(document["cells"]) == 2 * (2 + 1) * 2 and len(document["summary"]) == 2 * 3
    for row in document["summary"]:
        cells = [c for c in document["cells"] if c["algorithm"] == row["algorithm"] and c["mode"] == row["mode"]
                 and (c["epsilon"] is None) == (row["epsilon"] == "no DP")]
        assert len(cells) == 2
        assert row["hr@10_mean"] == pytest.approx(np.mean([c["hr@10"] for c in cells]))
        assert row["hr@10_std"] == pytest.approx(np.std([c["hr@10"] for c in cells]))
        private = row["epsilon"] != "no DP"
        assert (row["epsilon_spent_mean"] > 0) == private and row["epsilon_spent_mean"] <= 4.0 + 1e-6
    with (tmp_path / "sweep.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    table = [line for line in result.output.splitlines() if line.startswith("│ off")]  # issue 23: under "no DP"
    assert table and all(line.split("│")[3].strip() == "-" for line in table), result.output


def test_sweep_reads_a_csv_by_its_column_names(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["uid,sku,ts"] + [f"u{u},s{int(rng.integers(0, 200))},{1.7e9 + 60 * k}"
                             for u in range(12) for k in range(30)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(cli, ["sweep", "--dataset", "csv", "--data", str(tmp_path / "log.csv"), "--user-col",
                                      "uid", "--item-col", "sku", "--time-col", "ts", "--modes", "local",
                                      "--algorithms", "global", "--epsilons", "8", "--seeds", "0", "--rounds", "8",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["cells"][0]["mode"] == "local"


def test_sweep_rejects_a_bad_list_or_mode(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", "--epsilons", "8,lots", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "cannot read the list" in str(result.exception or result.output)
    result = CliRunner().invoke(cli, ["sweep", "--modes", "off", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "sweep modes" in str(result.exception or result.output)


def test_an_interrupted_sweep_reuses_only_cells_run_with_the_same_settings(tmp_path):
    args = ["sweep", "--modes", "distributed", "--algorithms", "global", "--epsilons", "4", "--seeds", "0",
            "--out", str(tmp_path)]
    assert CliRunner().invoke(cli, [*args, "--rounds", "3"]).exit_code == 0
    cell = next((tmp_path / "cells").glob("*/results.json"))
    results = json.loads(cell.read_text())
    results["final"]["hr@10"] = 0.123456  # marks the finished cell
    cell.write_text(json.dumps(results))
    assert CliRunner().invoke(cli, [*args, "--rounds", "3"]).exit_code == 0
    assert json.loads((tmp_path / "sweep.json").read_text())["cells"][0]["hr@10"] == 0.123456
    assert CliRunner().invoke(cli, [*args, "--rounds", "4"]).exit_code == 0  # other settings: run again
    assert json.loads((tmp_path / "sweep.json").read_text())["cells"][0]["hr@10"] != 0.123456
