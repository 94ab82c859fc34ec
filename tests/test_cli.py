"""Bad input to the CLI exits non-zero with one line saying what is wrong (no traceback)."""

import json
import subprocess
import sys

import pytest

from attune.simulations.datasets import load_csv


def attune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attune.simulations.cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "movielens", "--data", "/no/such/dir"], "u.data not found"),
        (["--dataset", "csv", "--data", "/no/such.csv"], "not found"),
        (["--dataset", "csv"], "--data is required"),
        (["--epsilon", "0"], "--epsilon must be > 0"),
        (["--epsilon", "-3"], "--epsilon must be > 0"),
        (["--dataset", "nope"], "unknown dataset"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    result = attune("simulate", "--out", str(tmp_path / "o"), *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_csv_without_named_columns_and_bad_timestamps(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("u,i,t\n1,a,100\n")
    result = attune("simulate", "--dataset", "csv", "--data", str(csv), "--out", str(tmp_path))
    assert result.returncode == 2 and "no column(s) user, item, timestamp" in result.stderr
    csv.write_text("user,item,timestamp\n1,a,yesterday\n")
    result = attune("simulate", "--dataset", "csv", "--data", str(csv), "--out", str(tmp_path))
    assert result.returncode == 2 and ":2:" in result.stderr and "must be numbers" in result.stderr
    unreadable = tmp_path / "dir.csv"
    unreadable.mkdir()
    result = attune("simulate", "--dataset", "csv", "--data", str(unreadable), "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_csv_loader_maps_ids_densely(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("who,what,when,w\nb,x,3,1\na,y,1,2\nb,y,2,0.5\n")
    log = load_csv(csv, user_col="who", item_col="what", time_col="when", weight_col="w")
    assert (log.num_users, log.num_items, len(log)) == (2, 2, 3)
    assert log.item_ids == ("x", "y")
    assert json.dumps(log.weights.tolist()) == "[1.0, 2.0, 0.5]"
