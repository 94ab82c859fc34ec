"""The sweep runs every cell on the fast backend and summarizes it over seeds."""

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from attune.simulations.cli import cli


def test_sweep_writes_a_table_over_seeds_and_a_plot(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", "--algorithms", "global,partial-local", "--epsilons", "4,none",
                                      "--seeds", "0,1", "--rounds", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert len(document["cells"]) == 8 and len(document["summary"]) == 4
    for row in document["summary"]:
        cells = [c for c in document["cells"] if c["algorithm"] == row["algorithm"]
                 and (c["epsilon"] is None) == (row["epsilon"] == "no DP")]
        assert row["hr@10_mean"] == pytest.approx(np.mean([c["hr@10"] for c in cells]))
        assert row["hr@10_std"] == pytest.approx(np.std([c["hr@10"] for c in cells]))
        private = row["epsilon"] != "no DP"
        assert (row["epsilon_max_mean"] > 0) == private and row["epsilon_max_mean"] <= 4.0 + 1e-6
    with (tmp_path / "sweep.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_sweep_rejects_a_bad_list(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", "--epsilons", "8,lots", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "cannot read the list" in str(result.exception or result.output)
