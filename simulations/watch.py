"""What a coordinator watches: the rounds of a run as the coordinator loop records them in
``rounds.jsonl`` (one JSON line per round, the same from a deployment's ``out-dir`` and from a
simulation's ``--out``), as a table and a plot.

Each line holds what the coordinator saw: the cohort it sampled, how many contributed, declined
(devices never say why), failed or were rejected by its own checks (with its reasons), whether the
round was aborted and why, the event-level epsilon of the device that spent most, and for an
evaluation round the noised estimate with its 95% interval (``attune.shared.evaluation``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.table import Table

from attune.shared.errors import DataError

ROUNDS = "rounds.jsonl"


def rounds_file(run_dir: Path) -> Path:
    """``rounds.jsonl`` of a run folder (or the file itself)."""
    path = Path(run_dir)
    path = path if path.name == ROUNDS else path / ROUNDS
    if not path.is_file():
        raise DataError(f"{path} not found: give the run's out-dir (a deployment's) or --out (a simulation's)")
    return path


def read_rounds(path: Path) -> list[dict]:
    """Every whole line recorded so far (a line being written is left for the next read)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    records = []
    for number, line in enumerate(text.split("\n")[:-1], 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number}: not a JSON line; is this a run's rounds.jsonl?") from None
        if not isinstance(record, dict) or "round" not in record:
            raise DataError(f"{path}:{number}: not a round record")
        records.append(record)
    return records


def interval(estimate: dict, key: str) -> str:
    """``estimate[key]`` with its 95% half-width, as the tables print it."""
    value, half = estimate.get(key), estimate.get(f"{key}_half_width")
    if value is None or half is None or value != value:
        return "-"
    return f"{value:.3f} ± {half:.3f}"


COLUMNS = ("round", "task", "cohort", "contributed", "declined", "rejected", "failed", "aborted", "epsilon",
           "device-level eps", "HR@10 (DP est.)", "popular HR@10")


def row(record: dict) -> list[str]:
    """One round as the table's cells (``COLUMNS``)."""
    evaluation = record.get("evaluation") or {}
    level = record.get("device_level_epsilon")
    return [str(record["round"]), record.get("task", "train"), str(record.get("sampled", "")),
            str(record.get("contributed", "")), str(record.get("refused", "")), str(record.get("rejected", "")),
            str(record.get("failed", "")), record.get("aborted") or "", f"{record.get('epsilon', 0.0):.3f}",
            "" if level is None else f"{level:.3f}", interval(evaluation, "hr"),
            interval(evaluation, "popular_hr")]


def table(records: list[dict], title: str) -> Table:
    """The rounds; a column no round fills (no aborted round, no device-level DP) is left out."""
    rows = [row(record) for record in records]
    kept = [k for k, name in enumerate(COLUMNS) if name not in ("aborted", "device-level eps")
            or any(cells[k] for cells in rows)]
    out = Table(title=title)
    for k in kept:
        out.add_column(COLUMNS[k], justify="left" if COLUMNS[k] in ("task", "aborted") else "right")
    for cells in rows:
        out.add_row(*(cells[k] for k in kept))
    return out


def rejections(records: list[dict]) -> Counter:
    """The coordinator's reasons for rejecting contributions, counted over the run."""
    return Counter(reason for record in records for reason in record.get("rejections", ()))


def plot(records: list[dict], path: Path) -> Path:
    """Devices per round (contributed, declined, failed), epsilon, and the DP-estimated HR@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    figure, (devices, epsilon, quality) = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("contributed", "contributed"), ("refused", "declined"), ("failed", "failed"),
                       ("rejected", "rejected")):
        devices.plot(rounds, [r.get(key, 0) for r in records], marker=".", label=label)
    devices.set(xlabel="round", ylabel="devices", title="devices per round")
    devices.legend()
    epsilon.plot(rounds, [r.get("epsilon", 0.0) for r in records], marker=".", label="event-level (max device)")
    if any(r.get("device_level_epsilon") is not None for r in records):
        epsilon.plot(rounds, [r.get("device_level_epsilon") or 0.0 for r in records], marker=".",
                     label="device-level")
    epsilon.set(xlabel="round", ylabel="epsilon", title="privacy spent")
    epsilon.legend()
    evaluated = [r for r in records if r.get("evaluation")]
    for key, label in (("hr", "model"), ("popular_hr", "popular list")):
        quality.errorbar([r["round"] for r in evaluated], [r["evaluation"][key] for r in evaluated],
                         yerr=[r["evaluation"][f"{key}_half_width"] for r in evaluated], marker="o", capsize=3,
                         label=label)
    quality.set(xlabel="round", ylabel="HR@10", title="federated evaluation (95% interval)")
    if evaluated:
        quality.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
