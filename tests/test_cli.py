"""The ``attune`` command: bad input exits non-zero with one line saying what is wrong (no
traceback, before any work), a diverged run says so, and the CSV loader reads what it should."""

import contextlib
import io
import json
import logging
import subprocess
import sys
import warnings

import pytest

from attune.simulations.cli import main
from attune.simulations.datasets import CsvColumns, load_csv


def attune(*args: str) -> subprocess.CompletedProcess:
    """One ``attune`` command run in this process as the console script runs it (``main``): its
    exit code and what it printed (a raw exception is not caught: the test fails with it)."""
    out, err = io.StringIO(), io.StringIO()
    code, flwr = 0, logging.getLogger("flwr")
    level = flwr.level  # the command quiets Flower's logs and warnings for its user: not for later tests
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            flwr.setLevel(level)
    return subprocess.CompletedProcess(["attune", *args], code, out.getvalue(), err.getvalue())


def test_the_console_script_runs_in_a_process_of_its_own(tmp_path):
    """The one subprocess smoke test: the installed entry point, an error as one line, exit 2."""
    result = subprocess.run([sys.executable, "-m", "attune.simulations.cli", "simulate", "--dataset", "nope",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == "error: unknown dataset 'nope': use synthetic, " \
        "movielens or csv" and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "movielens", "--data", "/no/such/dir"], "u.data not found"),
        (["--dataset", "csv", "--data", "/no/such.csv"], "not found"),
        (["--dataset", "csv"], "--data is required"),
        (["--epsilon", "0"], "target_epsilon must be a finite number"),
        (["--epsilon", "nan"], "target_epsilon must be a finite number"),
        (["--epsilon", "inf"], "target_epsilon must be a finite number"),
        (["--dataset", "nope"], "unknown dataset"),
        (["--aggregation", "foo"], "aggregation must be one of"),
        (["--dim", "0"], "dim must be an integer >= 1"),
        (["--mode", "secret"], "mode must be one of"),
        (["--mode", "off", "--epsilon", "8"], "target_epsilon needs a private mode"),
        (["--backend", "nope"], "unknown backend"),
        (["--devices-per-round", "5000"], "only 150 devices"),
        (["--rounds", "2"], "every device would refuse this run"),
        (["--rounds", "1"], "needs at least 2 rounds: round 1 counts the items"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    result = attune("simulate", "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("args", [  # issue 20: each printed a traceback
    ["simulate", "--synthetic-users", "30", "--rounds", "2", "--out", "{file}/x"],
    ["simulate", "--synthetic-users", "30", "--rounds", "2", "--out", "/proc/attune-x"],
    ["sweep", "--epsilons", "8", "--seeds", "0", "--modes", "distributed", "--algorithms", "partial-local",
     "--rounds", "2", "--out", "{file}/x"],
    ["audit", "--users", "30", "--out", "{file}/x.json"],
    ["credentials", "--out", "{file}/x"],
    ["credentials", "--host", "", "--out", "{tmp}/c1"],
    ["credentials", "--host", "not a host!", "--out", "{tmp}/c2"],
    ["simulate", "--epsilon", "1e308", "--synthetic-users", "30", "--out", "{tmp}/o"],
])
def test_unwritable_outputs_and_nonsense_values_are_one_line(tmp_path, args):
    (tmp_path / "afile").write_text("x")
    args = [a.format(file=tmp_path / "afile", tmp=tmp_path) for a in args]
    result = attune(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "c2").exists()  # a bad host writes nothing


@pytest.mark.parametrize("args", [
    ["simulate", "--out", ""], ["demo", "--out", " "], ["sweep", "--out", ""], ["audit", "--out", ""],
    ["credentials", "--out", ""], ["federation", "--out", ""], ["federation", "--port", "70000"],
    ["federation", "--port", "0"],
])
def test_an_empty_output_path_or_a_port_out_of_range_is_refused_and_writes_nothing(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    result = attune(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Invalid value for '--" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_pointing_at_a_file_fails_before_any_work(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("{}")
    result = attune("simulate", "--out", str(target))
    assert result.returncode == 2 and "is a file" in result.stderr and target.read_text() == "{}"


def test_a_diverged_run_says_so_and_exits_non_zero(tmp_path):
    result = attune("simulate", "--mode", "off", "--server-lr", "1e300", "--rounds", "3", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "diverged" in result.stderr and "Traceback" not in result.stderr


def test_a_run_writes_its_results_and_one_plain_line_per_round(tmp_path):
    result = attune("simulate", "--rounds", "3", "--synthetic-users", "30", "--dim", "8", "--eval-share", "0.05",
                    "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("round ") and "scoring" not in line]
    assert "round 3: scoring every device's held-out event" in result.stderr  # what takes time says so (issue 23)
    assert [line.split(":")[0] for line in lines] == ["round 1/4 (count)", "round 2/4 (train)", "round 3/4 (train)",
                                                      "round 4/4 (evaluate)"]  # plain lines
    assert "federated HR@10" in lines[-1] and "(DP estimate)" in lines[-1]
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["privacy"]["mode"] == "distributed" and results["dataset"]["users"] == 30
    shown = attune("runs", "show", str(tmp_path / "o"))  # what the coordinator watches, from rounds.jsonl
    assert shown.returncode == 0, shown.stderr
    assert "evaluate" in shown.stdout and "±" in shown.stdout and (tmp_path / "o" / "rounds.png").is_file()


def test_runs_show_says_what_is_missing_or_unreadable(tmp_path):
    missing = attune("runs", "show", str(tmp_path))
    assert missing.returncode == 2 and "rounds.jsonl not found" in missing.stderr
    (tmp_path / "rounds.jsonl").write_text("not json\n")
    assert "not a JSON line" in attune("runs", "show", str(tmp_path)).stderr


def test_csv_without_named_columns_and_bad_timestamps(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("u,i,t\n1,a,100\n")
    result = attune("simulate", "--dataset", "csv", "--data", str(csv), "--out", str(tmp_path))
    assert result.returncode == 2 and "no column(s) user, item, timestamp" in result.stderr
    csv.write_text("user,item,timestamp\n1,a,yesterday\n")
    result = attune("simulate", "--dataset", "csv", "--data", str(csv), "--out", str(tmp_path))
    assert result.returncode == 2 and ":2:" in result.stderr and "unix seconds or an ISO 8601 time" in result.stderr
    assert "weight" not in result.stderr  # no weight column was given (issue 23)
    unreadable = tmp_path / "dir.csv"
    unreadable.mkdir()
    result = attune("simulate", "--dataset", "csv", "--data", str(unreadable), "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_csv_loader_maps_ids_densely(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("who,what,when,w\nb,x,3,1\na,y,1,2\nb,y,2,0.5\n")
    log = load_csv(csv, CsvColumns(user="who", item="what", time="when", weight="w"))
    assert (log.num_users, log.num_items, len(log)) == (2, 2, 3)
    assert log.item_ids == ("x", "y")
    assert json.dumps(log.weights.tolist()) == "[1.0, 2.0, 0.5]"


def test_csv_loader_edge_rows(tmp_path):
    """Issue 20: a BOM (Excel's "CSV UTF-8") hid the first column, ids -1 and --1 crashed the id
    sort, a field over 128 KiB and NaN MovieLens timestamps gave tracebacks or were accepted."""
    from attune.shared.errors import DataError
    from attune.simulations.datasets import load_csv, load_movielens

    bom = tmp_path / "bom.csv"
    bom.write_text("user,item,timestamp\n1,a,1000000000\n2,b,1000000001\n", encoding="utf-8-sig")
    assert load_csv(bom).num_users == 2
    ids = tmp_path / "ids.csv"
    ids.write_text("user,item,timestamp\n-1,a,1000000000\n--1,b,1000000001\n")
    assert load_csv(ids).num_users == 2
    big = tmp_path / "big.csv"
    big.write_text("user,item,timestamp\n1," + "x" * 140_000 + ",1000000000\n")
    with pytest.raises(DataError, match="not a CSV file"):
        load_csv(big)
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("1\t2\t5\t881250949\n1\t3\t4\tnan\n")
    with pytest.raises(DataError, match="unix seconds"):
        load_movielens(tmp_path / "ml")


def test_csv_with_event_types_iso_times_and_tabs(tmp_path):
    """Issue 23: the loader had no event-type column, no ISO timestamps and no delimiter option."""
    from attune.shared.errors import DataError

    log_file = tmp_path / "log.tsv"
    log_file.write_text("who\twhat\twhen\tkind\n"
                        "b\tx\t2024-05-01T12:00:00Z\tpurchase\n"
                        "a\ty\t2024-05-01T12:00:00+02:00\tView\n"
                        "b\ty\t1714564800\tclick\n")
    columns = CsvColumns(user="who", item="what", time="when", event_type="kind", delimiter="tab")
    log = load_csv(log_file, columns)
    assert log.timestamps.tolist() == [1714564800.0, 1714557600.0, 1714564800.0]  # Z, +02:00, unix seconds
    assert log.weights.tolist() == [3.0, 0.5, 1.0]  # purchase, view, click
    with pytest.raises(DataError, match="no column.*delimiter ','"):
        load_csv(log_file, CsvColumns(user="who", item="what", time="when"))
    with pytest.raises(DataError, match="not both"):
        CsvColumns(weight="w", event_type="kind")
    log_file.write_text("user\titem\ttimestamp\ttype\nb\tx\tyesterday\tclick\n")
    with pytest.raises(DataError, match="ISO 8601"):
        load_csv(log_file, CsvColumns(delimiter="\\t"))
    log_file.write_text("user\titem\ttimestamp\ttype\nb\tx\t1714564800\tglance\n")
    with pytest.raises(DataError, match="event type 'glance'"):
        load_csv(log_file, CsvColumns(event_type="type", delimiter="tab"))
    result = attune("simulate", "--dataset", "csv", "--data", "no/such/log.csv", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "relative to the folder you run from" in result.stderr


def test_check_node_names_a_typo_and_checks_the_files_before_a_supernode_starts(tmp_path):
    """Issue 23: a node config typo (store_path=) was accepted at SuperNode start and crashed the
    ClientApp at the first round."""
    from attune.shared.signing import generate_keypair

    typo = attune("check-node", f"store_path='{tmp_path / 'd.sqlite'}'")
    assert typo.returncode == 2 and "unknown node config key(s) store_path" in typo.stderr
    unsigned = attune("check-node", f"store-path='{tmp_path / 'd.sqlite'}'")
    assert unsigned.returncode == 2 and "coordinator-public-key is missing" in unsigned.stderr
    generate_keypair(tmp_path / "c.pem", tmp_path / "c.pub.pem")
    (tmp_path / "vocabulary.json").write_text('["a", "b"]')
    (tmp_path / "afile").write_text("x")
    store, key = f"store-path='{tmp_path / 'd.sqlite'}'", f"coordinator-public-key='{tmp_path / 'c.pub.pem'}'"
    good = attune("check-node", f"{store} {key} vocabulary-path='{tmp_path / 'vocabulary.json'}' epsilon-budget=2.0")
    assert good.returncode == 0 and "2 item ids" in good.stdout and "Ed25519" in good.stdout, good.stderr
    assert not (tmp_path / "d.sqlite").exists()  # checking creates nothing
    for config, message in ((f"{store} {key} vocabulary-path='{tmp_path / 'c.pem'}'", "vocabulary-path"),
                            (f"{store} {key} epsilon-budget='lots'", "epsilon_budget"),
                            (f"store-path='{tmp_path / 'afile' / 'd.sqlite'}' {key}", "store-path")):
        result = attune("check-node", config)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
