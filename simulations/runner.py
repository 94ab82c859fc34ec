"""``attune simulate``: one federation over a behavior log, one virtual device per user, through the
in-process backend (``fast``) or ``flwr run`` of the real ServerApp and ClientApp in Flower's
simulation runtime (``flower``). Both run the same coordinator loop and device round. Writes ``results.json`` and
``curve.png`` to the output folder.

Quality is measured by the simulator, which keeps each user's held-out event (devices send
nothing for evaluation): every evaluated round, each device's ranking is computed as the device
would compute it (``attune.simulations.algorithms``) and scored on its held-out candidates.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from attune.client.policy import PrivacyConfig, noise_refusal
from attune.server.config import ServerConfig
from attune.server.coordinator import RoundRecord, most_spent, run, spent
from attune.server.planning import Plan, plan
from attune.shared import evaluation
from attune.shared.accounting import ACCOUNTANT_NAME, Entry, epsilon_of, ledger_to_json
from attune.shared.config import PrivacyMode, RoundTask, knob, validate
from attune.shared.errors import ConfigError, DataError
from attune.shared.mechanism import sensitivity
from attune.shared.metrics import hit_and_ndcg
from attune.shared.model import shared_model
from attune.shared.statements import DEVICE_LEVEL, DISCLOSED, statement
from attune.shared.tags import TagAffinity, person_tags, tag_lift
from attune.simulations.algorithms import algorithm
from attune.simulations.datasets import CsvColumns, EventLog, load_csv, load_movielens, load_tags, synthetic
from attune.simulations.evaluation import Ranking, Split, leave_one_out, popularity_baseline, skew_data_sizes
from attune.simulations.fast import NOISE, Devices, InProcessTransport, device_cohort
from attune.simulations.report import beyond_accuracy

BACKENDS = ("fast", "flower")


@dataclass(frozen=True)
class DataSource:
    """Which behavior log to simulate."""

    dataset: str = knob("synthetic", "synthetic, movielens or csv")
    path: Path | None = knob(None, "the ml-100k folder (u.data) or a CSV file")
    user_col: str = knob("user", "CSV column of user ids")
    item_col: str = knob("item", "CSV column of item ids")
    time_col: str = knob("timestamp", "CSV column of times: unix seconds or ISO 8601 (UTC unless it says)")
    weight_col: str | None = knob(None, "CSV column of event weights")
    type_col: str | None = knob(None, "CSV column of event types (view, click, like, purchase, ...), weighted "
                                "by type; instead of a weight column")
    delimiter: str = knob(",", "CSV delimiter: one character, or tab")
    synthetic_users: int = knob(150, "synthetic: people (devices)", low=2, high=10**7)
    synthetic_items: int = knob(600, "synthetic: items in the catalog", low=100, high=10**7)
    synthetic_zipf: float = knob(0.8, "synthetic: popularity skew, item r of the catalog has popularity 1/r^zipf",
                                 low=0.0, high=4.0)
    synthetic_taste: float = knob(3.0, "synthetic: how strongly taste decides a pick, against popularity",
                                  low=0.0, high=20.0)
    synthetic_events: str = knob("150", "synthetic: events per person, a mean (Poisson) or a range LOW-HIGH "
                                 "(uniform)")
    synthetic_tags: int = knob(0, "synthetic: categories the catalog lists, one per item (0: none)", low=0,
                               high=10**4)
    tags: Path | None = knob(None, "CSV of item tags (columns item and tag, a row per tag of an item); "
                             "MovieLens' genres are read from u.item")

    def __post_init__(self) -> None:
        if self.dataset not in ("synthetic", "movielens", "csv"):
            raise DataError(f"unknown dataset {self.dataset!r}: use synthetic, movielens or csv")
        validate(self)
        self.events_per_user()

    def events_per_user(self) -> int | tuple[int, int]:
        """``synthetic_events`` read: a mean, or a ``(low, high)`` range."""
        text = str(self.synthetic_events).strip()
        low, dash, high = text.partition("-")
        try:
            values = (int(low), int(high)) if dash else int(low)
        except ValueError:
            values = None
        ranges = values if isinstance(values, tuple) else (values, values)
        if values is None or not 2 <= ranges[0] <= ranges[1] <= 10**6:  # type: ignore[operator]
            raise DataError(f"synthetic_events must be a mean like 150 or a range like 30-150 (2 to 1e6), "
                            f"got {self.synthetic_events!r}")
        return values

    def described(self) -> dict:
        """The source as ``results.json`` records it: only the options its dataset reads."""
        values = as_json(self)
        return {key: value for key, value in values.items()
                if not (key.startswith("synthetic_") and self.dataset != "synthetic")
                and not ((key.endswith("_col") or key == "delimiter") and self.dataset != "csv")}

    def load(self, seed: int) -> EventLog:
        if self.dataset == "synthetic":
            log = synthetic(num_users=self.synthetic_users, num_items=self.synthetic_items,
                            zipf=self.synthetic_zipf, taste=self.synthetic_taste,
                            events_per_user=self.events_per_user(), tags=self.synthetic_tags, seed=seed)
        elif self.path is None:
            raise DataError(f"--data is required with --dataset {self.dataset}")
        elif self.dataset == "movielens":
            log = load_movielens(self.path)
        else:
            log = load_csv(self.path, CsvColumns(user=self.user_col, item=self.item_col, time=self.time_col,
                                                 weight=self.weight_col, event_type=self.type_col,
                                                 delimiter=self.delimiter))
        if self.tags is not None:
            log = replace(log, item_tags=load_tags(self.tags, log.item_ids, delimiter=self.delimiter))
        return log


@dataclass(frozen=True)
class SimulationConfig:
    """Everything one simulation needs; the CLI builds it, nothing reads flags deeper down."""

    source: DataSource
    server: ServerConfig
    out: Path
    backend: str = knob("fast", "fast (in-process) or flower (flwr run in Flower's simulation runtime, real "
                        "SecAgg+)")
    algorithm: str = knob("partial-local", "how devices rank: partial-local, ditto or global")
    availability: float = knob(1.0, "share of sampled devices online in a round (fast backend)")
    data_skew: float = knob(0.0, "0: every device keeps all its events; 1, 2, ...: most keep few")
    noise: str = knob("aggregate", "fast backend: aggregate (the shares' total drawn once) or per-device")
    evaluations: int = knob(10, "rounds evaluated, evenly spread (the last always)")
    device_privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # every device's own limits
    tag_affinity: TagAffinity = field(default_factory=TagAffinity)  # how devices rank with the catalog's tags

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}: use fast or flower")
        algorithm(self.algorithm)
        if self.noise not in NOISE:
            raise ConfigError(f"noise must be one of {', '.join(NOISE)}, got {self.noise!r}")
        if not 0 < self.availability <= 1:
            raise ConfigError(f"availability must be in (0, 1], got {self.availability}")
        if self.availability < 1 and self.backend != "fast":
            raise ConfigError("--availability is simulated by the fast backend only")
        if not self.data_skew >= 0 or not math.isfinite(self.data_skew):
            raise ConfigError(f"data skew must be a finite number >= 0, got {self.data_skew}")
        if isinstance(self.evaluations, bool) or not isinstance(self.evaluations, int) or self.evaluations < 1:
            raise ConfigError(f"evaluations must be a positive integer, got {self.evaluations!r}")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a folder")


def evaluated_rounds(rounds: int, count: int) -> set[int]:
    return {round(rounds * (k + 1) / count) for k in range(min(count, rounds))} | {rounds}


def device_privacy(server: ServerConfig, run_plan: Plan, base: PrivacyConfig) -> PrivacyConfig:
    """Simulated devices hold the run's target as their budget (what a deployment would set)."""
    private = run_plan.round.private
    budget = run_plan.target_epsilon if private and run_plan.target_epsilon else base.epsilon_budget
    return replace(base, epsilon_budget=budget, delta=server.delta, allow_non_private=not private)


@dataclass
class _Progress:
    history: list[RoundRecord] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    report: dict | None = None
    started: float = field(default_factory=time.monotonic)
    seconds: list[float] = field(default_factory=list)
    estimates: dict[int, dict[str, float] | None] = field(default_factory=dict)  # evaluation rounds' estimates
    final: dict[str, float] = field(default_factory=dict)  # the exact metrics after the last training round


def simulate(config: SimulationConfig, on_round: Callable[[RoundRecord, dict], None] | None = None,
             log: EventLog | None = None, on_status: Callable[[str], None] | None = None) -> dict:
    """Run the simulation and return (and write) the results document. ``on_status`` hears what
    takes time between rounds (scoring every device)."""
    server = config.server
    log = log if log is not None else config.source.load(server.seed)
    if log.num_users < 2:
        raise DataError(f"{log.name}: a federation needs at least 2 users, the log has {log.num_users}")
    split = skew_data_sizes(log, leave_one_out(log, seed=server.seed), config.data_skew, server.seed)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "rounds.jsonl").unlink(missing_ok=True)
    model = replace(server.model, num_items=log.num_items)
    server = replace(server, model=model, out_dir=out, min_devices=log.num_users,
                     noise_seed=server.seed if server.noise_seed is None else server.noise_seed)
    run_plan = plan(server, log.num_users)
    privacy = device_privacy(server, run_plan, config.device_privacy)
    rounds = [c for c in (run_plan.count, run_plan.round) if c is not None]
    refused = next(filter(None, (noise_refusal(model, c, privacy) for c in rounds)), None)
    if refused:
        why = ("raise the noise" if run_plan.target_epsilon is None else
               f"the noise reaching epsilon {run_plan.target_epsilon} over {run_plan.participations} planned "
               "rounds per device is that low: plan more rounds or a larger cohort, or lower the epsilon")
        raise ConfigError(f"every device would refuse this run: {refused}; {why}")
    cohort = device_cohort(log, split, model.use_context)
    ranker = algorithm(config.algorithm)
    tags = log.item_tags if ranker.personal and config.tag_affinity.tag_strength else None
    own_tags = None if tags is None else person_tags(tags, cohort.items, cohort.device_of_events(), len(cohort))

    def ranked(state: dict[str, torch.Tensor], devices: Devices) -> Ranking:
        """How every device ranks its held-out candidates: the algorithm's scores, plus its
        person's tag affinity when the catalog has tags (on the device, from its own events)."""
        ranking = ranker.rank(state, model, devices.users, devices.started, cohort, split, server.seed)
        if tags is None or own_tags is None:
            return ranking
        shares = tags.shares(shared_model(model).all_items(state)[1])
        lift = tag_lift(tags, shares, own_tags, torch.from_numpy(split.candidates), config.tag_affinity)
        return replace(ranking, scores=ranking.scores + lift)
    evaluate_at = evaluated_rounds(server.rounds, config.evaluations)
    progress = _Progress()

    def evaluate(record: RoundRecord, state: dict[str, torch.Tensor], devices_now: Callable[[], Devices]) -> None:
        progress.history.append(record)
        progress.seconds.append(time.monotonic() - progress.started)
        if record.task == RoundTask.EVALUATE.value:  # the coordinator's DP estimate, beside the exact value
            progress.estimates[record.round] = record.evaluation
        elif len(progress.history) - len(progress.estimates) in evaluate_at:  # the training round's number
            if on_status is not None:
                on_status(f"round {record.round}: scoring every device's held-out event ({ranker.name})")
            devices = devices_now()
            ranking = ranked(state, devices)
            hits, gains = hit_and_ndcg(ranking.scores.numpy())
            if not np.isfinite(ranking.scores.numpy()).all():
                raise DataError(f"round {record.round}: the model diverged (non-finite scores); lower the "
                                "server learning rate")
            progress.metrics[record.round] = {"hr@10": float(hits.mean()), "ndcg@10": float(gains.mean())}
            if len(progress.history) - len(progress.estimates) == server.rounds:
                progress.final = progress.metrics[record.round]
                vectors, global_bias = shared_model(model).all_items(state)
                bias = global_bias.numpy()
                progress.report = {"algorithm": ranker.name, **beyond_accuracy(
                    log, split, vectors.numpy(),
                    bias if ranking.bias is None else ranking.bias.numpy(), ranking.personal.numpy(),
                    ranking.global_only.numpy(), global_bias=bias)}
        if on_round is not None:
            on_round(record, progress.metrics.get(record.round, {}))

    def statistics(state: dict[str, torch.Tensor], devices: Devices) -> torch.Tensor:
        """What each device would evaluate: its held-out event, ranked as ``evaluate`` ranks it but
        for the tag affinity, which a device leaves out of its evaluation rows (it depends on all
        its events; a row must depend on its own event alone: ``docs/privacy.md``)."""
        ranking = ranker.rank(state, model, devices.users, devices.started, cohort, split, server.seed)
        _, popular = shared_model(model).item_side(state, torch.from_numpy(split.candidates))
        return evaluation.statistics(ranking.scores, popular)

    if config.backend == "fast":
        transport = InProcessTransport(cohort, server.seed, privacy, availability=config.availability,
                                       noise=config.noise, evaluator=statistics)
        torch.set_num_threads(1)
        def current_devices() -> Devices:
            assert transport.devices_state is not None  # set in the first round, before any evaluation
            return transport.devices_state

        run(transport, server, lambda r, s: evaluate(r, s, current_devices))
        assert transport.devices_state is not None
        ledger, local = _fast_ledgers(transport.devices_state, server, run_plan)
        secure = "simulated: the sum is computed directly" if run_plan.round.private else "none"
        noise = config.noise if run_plan.round.private else "none"
    else:
        from attune.simulations.flower_backend import run_flower

        training = [r for r in range(1, run_plan.server_rounds(server.rounds) + 1)
                    if r not in run_plan.evaluation_rounds]  # the server round of each training round
        ledger, local = run_flower(log, split, server, privacy, {training[t - 1] for t in evaluate_at}, evaluate)
        secure = "flower-secagg+ (hardened)" if server.uses_secure_aggregation else "none"
        noise = "per-device" if run_plan.round.private else "none"
    if len(progress.history) < run_plan.server_rounds(server.rounds):
        raise ConfigError(f"the run stopped after {len(progress.history)} of {run_plan.server_rounds(server.rounds)} "
                          "rounds (device-level budget)")
    results = build_results(log, split, server, run_plan, progress, ledger, local, secure=secure, noise=noise)
    results.update(backend=config.backend, algorithm=ranker.name, beyond_accuracy=progress.report,
                   tags={"catalog_tags": None if log.item_tags is None else log.item_tags.num_tags,
                         "used": tags is not None, **asdict(config.tag_affinity)},
                   heterogeneity={"availability": config.availability, "data_skew": config.data_skew})
    results["config"]["source"] = config.source.described()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curve(results, out / "curve.png")
    return results


def _fast_ledgers(devices: Devices, server: ServerConfig, run_plan: Plan) -> tuple[list[Entry], list[Entry]]:
    """The ledger of the device that spent most (every device's is its count, training and
    evaluation rounds, as planned)."""
    _, *kind = most_spent(server.model, run_plan, devices.joined_rounds(), server.delta)
    return tuple(spent(server.model, run_plan, *kind, local=local)  # type: ignore[return-value]
                 for local in (False, True))


def _federated(progress: _Progress, run_plan: Plan, server: ServerConfig) -> dict | None:
    """The last evaluation round's DP estimate beside the exact value it estimates, and what the
    evaluation rounds cost alone (their share of every device's ledger)."""
    if not progress.estimates:
        return None
    last = progress.estimates[max(progress.estimates)]
    exact = progress.final.get("hr@10")
    covered = None
    if last is not None and exact is not None and math.isfinite(last["hr_half_width"]):
        covered = abs(last["hr"] - exact) <= last["hr_half_width"]
    alone = spent(server.model, replace(run_plan, count=None), 0, 0, len(run_plan.evaluation_rounds))
    return {"estimate": None if last is None else {k: _r(v) for k, v in last.items()}, "exact_hr@10": _r(exact),
            "covered": covered, "eval_share": server.eval_share, "rounds": list(run_plan.evaluation_rounds),
            "epsilon_alone": _r(epsilon_of(alone, server.delta)),
            "noise_multiplier": None if run_plan.evaluation is None else run_plan.evaluation.noise_multiplier,
            "interval": "95%, for the noise added (the devices that took part, not a sample of people)"}


def _r(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def build_results(log: EventLog, split: Split, server: ServerConfig, run_plan: Plan, progress: _Progress,
                  ledger: list[Entry], local: list[Entry], *, secure: str, noise: str) -> dict:
    """The results document. ``privacy.history_max`` is the whole ledger of the device that spent
    the most, so anyone can recompute ``epsilon`` (and ``history_local_max``, ``epsilon_local``)."""
    round_config = run_plan.round
    private = round_config.private
    rounds = [{"round": r.round, "contributed": r.contributed, "refused": r.refused, "rejected": r.rejected,
               "failed": r.failed, "aborted": r.aborted, "epsilon": _r(r.epsilon),
               "device_level_epsilon": _r(r.device_level_epsilon),
               "hr@10": _r(progress.metrics.get(r.round, {}).get("hr@10")),
               "ndcg@10": _r(progress.metrics.get(r.round, {}).get("ndcg@10")),
               "seconds": _r(seconds), "task": r.task,
               "evaluation": None if r.evaluation is None else {k: _r(v) for k, v in r.evaluation.items()}}
              for r, seconds in zip(progress.history, progress.seconds, strict=True)]
    final = progress.final
    last = progress.history[-1]
    device_level = None
    if run_plan.device_level_noise > 0:
        device_level = {"statement": DEVICE_LEVEL, "epsilon": _r(last.device_level_epsilon),
                        "delta": server.device_level_delta, "noise_multiplier": run_plan.device_level_noise,
                        "sample_rate": run_plan.sample_rate, "rounds": len(progress.history),
                        "history": ledger_to_json([run_plan.device_level_entry().times(len(progress.history))])}
    return {
        "label": f"DP ({round_config.mode.value}, event-level)" if private else "NON-PRIVATE: no differential privacy",
        "private": private,
        "dataset": {"name": log.name, "users": log.num_users, "items": log.num_items, "events": len(log)},
        "final": {"hr@10": _r(final.get("hr@10")), "ndcg@10": _r(final.get("ndcg@10"))},
        "federated_evaluation": _federated(progress, run_plan, server),
        "baseline": {"popular": {k: _r(v) for k, v in popularity_baseline(log, split).items()}},
        "rounds": rounds,
        "privacy": {
            "mode": round_config.mode.value,
            "statement": statement(round_config.mode),
            "disclosed": DISCLOSED,
            "unit": "event",
            "neighbouring": "add or remove one event of one device",
            "trust": {"secure_aggregation": secure, "min_survivors": round_config.min_survivors,
                      "colluders": round_config.colluders} if round_config.privacy is PrivacyMode.DISTRIBUTED
            else {"secure_aggregation": secure},
            "epsilon": _r(epsilon_of(ledger, server.delta)) if private else None,
            "epsilon_local": _r(epsilon_of(local, server.delta)) if private else None,
            "delta": server.delta,
            "target_epsilon": run_plan.target_epsilon,
            "noise_multiplier": round_config.noise_multiplier if private else 0.0,
            "user_noise_multiplier": round_config.user_noise_multiplier if private else 0.0,
            "clip": round_config.clip,
            "sensitivity_units": sensitivity(server.model, round_config),
            "planned_rounds_per_device": run_plan.participations,
            "history_max": ledger_to_json(ledger),
            "history_local_max": ledger_to_json(local),
            "accountant": ACCOUNTANT_NAME,
            "noise_source": "ChaCha20 keyed from the run's seed (simulation: reproducible, not secret)",
            "noise": noise,
            "device_level": device_level,
        },
        "config": {"server": as_json(server), "round": asdict(round_config),
                   "expected_cohort": run_plan.expected_cohort},
    }


def as_json(config: object) -> dict:
    """A config dataclass as ``results.json`` records it (paths and enums as strings)."""
    return json.loads(json.dumps(asdict(config), default=str))  # type: ignore[call-overload]


def plot_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results["rounds"] if r["hr@10"] is not None]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot([r["round"] for r in measured], [r["hr@10"] for r in measured], marker="o", label="HR@10")
    left.axhline(results["baseline"]["popular"]["hr@10"], ls="--", c="grey", label="popular HR@10")
    left.set_xlabel("round")
    left.set_ylabel("HR@10")
    handles = left.get_legend_handles_labels()[0]
    if results["private"]:
        right = left.twinx()
        right.plot([r["round"] for r in results["rounds"]], [r["epsilon"] for r in results["rounds"]], c="tab:red",
                   label="epsilon (device joining most)")
        right.set_ylabel("epsilon")
        handles += right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower right", fontsize=8)
    left.set_title(results["label"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quiet_third_parties() -> None:
    """Third-party warnings (Flower's deprecations, Ray's FutureWarning) do not reach the user."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("flwr").setLevel(logging.ERROR)
