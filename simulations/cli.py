"""The ``attune`` command: ``simulate``, ``demo``, ``sweep``, ``audit``, ``credentials`` and
``federation``. Flags are parsed here and nowhere else."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from attune.shared.errors import AttuneError

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Attune: private on-device personalization with federated learning.")
console = Console(stderr=True)

DEFAULTS = {
    # Recommended settings for event-level DP at MovieLens-100K scale (README "Measured results"):
    # full-batch steps, most of the budget on the shared side (1 user epoch, 4 global epochs with
    # the user vector frozen), one negative and a small dim so each event's clipped gradient
    # carries as much signal per noised coordinate as possible.
    "rounds": 10, "local_epochs": 4.0, "user_epochs": 1.0, "sample_rate": 1.0, "lr": 6.0,
    "user_lr": 3.0, "server_lr": 10.0, "max_grad_norm": 1.0, "dim": 4, "negatives": 1,
    "context": False, "joint_user": False,
}


def _run(options: dict, source, out: Path, backend: str = "flower", **simulation: object) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attune.simulations.runner import SimulationConfig, server_config, simulate

    server = server_config(**options)
    config = SimulationConfig(source=source, server=server, out=out, backend=backend, **simulation)
    log = source.load(server.seed)  # bad input fails here, before any progress is drawn
    with Progress(TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("preparing devices", total=server.rounds)

        def on_round(done) -> None:
            hr = done.evaluate.get("hr@10", float("nan"))
            eps = done.train.get("epsilon-max", 0.0)
            bar.update(task, advance=1, description=f"HR@10 {hr:.3f}  epsilon {eps:.2f}")

        results = simulate(config, on_round, log)
    _print_table(results, out)
    return results


def _print_table(results: dict, out: Path) -> None:
    table = Table(title=f"{results['dataset']['name']}: {results['label']}")
    for column in ("round", "HR@10", "NDCG@10", "epsilon (max)"):
        table.add_column(column, justify="right")
    for row in results["rounds"]:
        table.add_row(str(row["round"]), f"{row['hr@10']:.4f}", f"{row['ndcg@10']:.4f}",
                      f"{row['epsilon_max']:.3f}")
    pop = results["baseline"]["popular"]
    table.add_row("popular", f"{pop['hr@10']:.4f}", f"{pop['ndcg@10']:.4f}", "-")
    Console().print(table)
    Console().print(f"results: {out / 'results.json'}  curve: {out / 'curve.png'}")


@cli.command()
def simulate(
    dataset: str = typer.Option("synthetic", help="synthetic, movielens or csv"),
    data: Path | None = typer.Option(None, help="ml-100k folder (u.data) or CSV file"),
    user_col: str = typer.Option("user", help="CSV column of user ids"),
    item_col: str = typer.Option("item", help="CSV column of item ids"),
    time_col: str = typer.Option("timestamp", help="CSV column of unix timestamps"),
    weight_col: str | None = typer.Option(None, help="CSV column of event weights"),
    rounds: int = typer.Option(DEFAULTS["rounds"]),
    clients_per_round: int = typer.Option(0, help="devices per round; 0 = all"),
    local_epochs: float = typer.Option(DEFAULTS["local_epochs"]),
    user_epochs: float = typer.Option(DEFAULTS["user_epochs"], help="user-vector fit epochs"),
    epsilon: float = typer.Option(8.0, help="per-device event-level epsilon budget"),
    delta: float = typer.Option(1e-5),
    noise_multiplier: float | None = typer.Option(None, help="default: calibrated to epsilon"),
    max_grad_norm: float = typer.Option(DEFAULTS["max_grad_norm"]),
    sample_rate: float = typer.Option(DEFAULTS["sample_rate"], help="Poisson rate per step"),
    lr: float = typer.Option(DEFAULTS["lr"]),
    user_lr: float = typer.Option(DEFAULTS["user_lr"]),
    server_lr: float = typer.Option(DEFAULTS["server_lr"]),
    server_optimizer: str = typer.Option("sgd", help="sgd (FedAvg step) or adam (FedAdam)"),
    aggregation: str = typer.Option("mean", help="mean, trimmed-mean or median"),
    update_clip: float = typer.Option(0.0, help="devices clip their whole update to this norm"),
    user_epsilon: float | None = typer.Option(
        None, help="user-level DP on the aggregate: epsilon over all rounds (needs --update-clip)"),
    dim: int = typer.Option(DEFAULTS["dim"]),
    negatives: int = typer.Option(DEFAULTS["negatives"], help="sampled negatives per event"),
    context: bool = typer.Option(DEFAULTS["context"], help="train the context encoder"),
    joint_user: bool = typer.Option(DEFAULTS["joint_user"],
                                    help="also train the user vector in the global phase"),
    no_dp: bool = typer.Option(False, "--no-dp", help="train WITHOUT privacy (labelled so)"),
    seed: int = typer.Option(0),
    backend: str = typer.Option("flower", help="flower (Flower simulation engine) or fast (in-process)"),
    availability: float = typer.Option(1.0, help="share of sampled devices online each round (fast)"),
    algorithm: str = typer.Option("partial-local", help="partial-local, global, finetune, ditto or ifca "
                                  "(all but partial-local: --backend fast)"),
    segments: int = typer.Option(2, help="ifca: number of segment models"),
    choice_share: float = typer.Option(0.2, help="ifca: share of each device's budget spent on its "
                                       "private choices of segment"),
    data_skew: float = typer.Option(0.0, help="0 = every device keeps all its events; 1, 2, ... = "
                                    "most devices keep few"),
    out: Path = typer.Option(Path("runs/simulate")),
) -> None:
    """Federated simulation: one virtual device per user, real ServerApp and ClientApp."""
    from attune.simulations.runner import DataSource

    source = DataSource(dataset=dataset, path=data, user_col=user_col, item_col=item_col,
                        time_col=time_col, weight_col=weight_col)
    options = dict(rounds=rounds, clients_per_round=clients_per_round, local_epochs=local_epochs,
                   user_epochs=user_epochs, epsilon=epsilon, delta=delta,
                   noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                   sample_rate=sample_rate, lr=lr, user_lr=user_lr, server_lr=server_lr, dim=dim,
                   no_dp=no_dp, seed=seed, negatives=negatives, context=context, joint_user=joint_user,
                   server_optimizer=server_optimizer, aggregation=aggregation,
                   update_clip=update_clip, user_epsilon=user_epsilon)
    from attune.simulations.algorithms import SegmentConfig

    _run(options, source, out, backend, availability=availability, data_skew=data_skew, algorithm=algorithm,
         segments=SegmentConfig(count=segments, choice_share=choice_share))


@cli.command()
def demo(out: Path = typer.Option(Path("runs/demo")), seed: int = typer.Option(0)) -> None:
    """A few-minute federated run on the built-in synthetic data, DP on (epsilon 8)."""
    from attune.simulations.runner import DataSource

    options = dict(DEFAULTS, rounds=10, clients_per_round=0, epsilon=8.0, delta=1e-5,
                   noise_multiplier=None, no_dp=False, seed=seed)
    _run(options, DataSource("synthetic"), out)


def _list(text: str, parse) -> tuple:
    try:
        return tuple(parse(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise AttuneError(f"cannot read the list {text!r}: {error}") from None


@cli.command()
def sweep(
    dataset: str = typer.Option("synthetic", help="synthetic, movielens or csv"),
    data: Path | None = typer.Option(None, help="ml-100k folder (u.data) or CSV file"),
    algorithms: str = typer.Option("global,finetune,partial-local,ditto,ifca"),
    epsilons: str = typer.Option("1,2,4,8,none", help="per-device epsilons; none = no DP"),
    seeds: str = typer.Option("0,1"),
    rounds: int = typer.Option(DEFAULTS["rounds"]),
    clients_per_round: int = typer.Option(0, help="devices per round; 0 = all"),
    out: Path = typer.Option(Path("runs/sweep")),
) -> None:
    """Privacy/utility sweep on the fast backend: algorithms x epsilon x seeds, a table (CSV and
    JSON, mean and std over seeds) and a plot of HR@10 against epsilon per algorithm."""
    from attune.simulations.runner import DataSource
    from attune.simulations.sweep import SweepConfig, run_sweep

    grid = SweepConfig(
        source=DataSource(dataset=dataset, path=data),
        options=dict(DEFAULTS, rounds=rounds, clients_per_round=clients_per_round, delta=1e-5,
                     noise_multiplier=None),
        algorithms=_list(algorithms, str),
        epsilons=_list(epsilons, lambda v: None if v.lower() == "none" else float(v)),
        seeds=_list(seeds, int), out=out)
    total = len(grid.algorithms) * len(grid.epsilons) * len(grid.seeds)
    done = [0]

    def on_cell(cell: dict) -> None:
        done[0] += 1
        console.print(f"[{done[0]}/{total}] {cell['algorithm']} epsilon={cell['epsilon']} "
                      f"seed={cell['seed']}: HR@10 {cell['hr@10']:.4f}")

    rows = run_sweep(grid, on_cell)
    table = Table(title=f"sweep: HR@10 (mean ± std over {len(grid.seeds)} seeds)")
    table.add_column("algorithm")
    for epsilon in dict.fromkeys(r["epsilon"] for r in rows):
        table.add_column(f"eps {epsilon}", justify="right")
    for algorithm in grid.algorithms:
        mine = [r for r in rows if r["algorithm"] == algorithm]
        table.add_row(algorithm, *(f"{r['hr@10_mean']:.3f} ± {r['hr@10_std']:.3f}" for r in mine))
    Console().print(table)
    Console().print(f"table: {out / 'sweep.csv'}  plot: {out / 'sweep.png'}")


@cli.command()
def audit(
    dataset: str = typer.Option("synthetic", help="synthetic or movielens"),
    data: Path | None = typer.Option(None, help="ml-100k folder (u.data)"),
    noise_multiplier: float = typer.Option(1.0, help="DP noise multiplier of the local round"),
    no_dp: bool = typer.Option(False, "--no-dp", help="audit training WITHOUT privacy"),
    local_epochs: float = typer.Option(2.0),
    dim: int = typer.Option(DEFAULTS["dim"]),
    guess_fraction: float = typer.Option(0.2, help="share of canaries the auditor guesses on"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/audit.json")),
) -> None:
    """Empirical privacy audit with one training run (Steinke, Nasr, Jagielski 2023): canary
    events in half the devices, membership guesses from the updates the coordinator sees, and an
    epsilon lower bound beside the accounted epsilon."""
    from attune.shared.config import TrainConfig
    from attune.shared.model import ModelConfig
    from attune.simulations.audit import audit as run_audit
    from attune.simulations.evaluation import leave_one_out
    from attune.simulations.runner import DataSource

    log = DataSource(dataset=dataset, path=data, synthetic_users=1000).load(seed)
    train = TrainConfig(private=not no_dp, noise_multiplier=noise_multiplier, sample_rate=1.0,
                        local_epochs=local_epochs, user_epochs=1.0, lr=1.0)
    result = run_audit(log, leave_one_out(log, seed=seed),
                       ModelConfig(num_items=log.num_items, dim=dim, use_context=False), train,
                       guess_fraction=guess_fraction, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": log.name, "private": not no_dp, **result.as_dict()}, indent=2))
    accounted = "none (no DP)" if result.epsilon_accounted is None else f"{result.epsilon_accounted:.2f}"
    Console().print(f"{result.correct}/{result.guesses} membership guesses correct over {result.canaries} "
                    f"canaries: epsilon lower bound {result.epsilon_lower_bound:.2f} "
                    f"({result.confidence:.0%} confidence), accounted epsilon {accounted}. -> {out}")


@cli.command()
def credentials(
    out: Path = typer.Option(Path("deploy/credentials")),
    host: list[str] = typer.Option(["127.0.0.1"], help="SuperLink host name or IP (repeatable)"),
    supernodes: int = typer.Option(3, help="SuperNode key pairs to create"),
) -> None:
    """Create a deployment's credentials: TLS CA and SuperLink certificate, SuperNode keys,
    and the coordinator's model-signing key."""
    from attune.server.credentials import create_credentials

    creds = create_credentials(out, host, supernodes)
    Console().print(f"credentials in {creds.directory}: CA {creds.ca_cert.name}, SuperLink "
                    f"{creds.server_cert.name}/{creds.server_key.name}, SuperNode keys supernode_<i>"
                    f"(.pub), signing key {creds.signing_key.name} (devices get {creds.verify_key.name})")


@cli.command()
def federation(
    supernodes: int = typer.Option(3, help="SuperNodes, each with its own device store"),
    rounds: int = typer.Option(3),
    out: Path = typer.Option(Path("runs/federation")),
    port: int = typer.Option(18000, help="SuperLink port on 127.0.0.1"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS and no SuperNode authentication "
                                  "(local experiments only)"),
    app: Path = typer.Option(Path("."), help="the Attune project directory (its pyproject.toml)"),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation",
                                            help="SecAgg+: the coordinator sees only the mean update"),
) -> None:
    """A Deployment Engine federation on this machine: SuperLink + SuperNodes on synthetic device
    stores, `flwr run` of the Attune app with DP, then every process is stopped."""
    from attune.server.deployment import FederationConfig, LocalFederation
    from attune.simulations.datasets import synthetic
    from attune.simulations.devices import store_path, write_devices
    from attune.simulations.evaluation import leave_one_out

    if supernodes < 1 or rounds < 1:
        raise AttuneError("--supernodes and --rounds must be at least 1")
    log = synthetic(num_users=max(supernodes, 10), seed=0)  # enough users for a full catalog
    vocabulary = write_devices(log, leave_one_out(log), out / "devices")
    stores = tuple(store_path(out / "devices", user) for user in range(supernodes))
    config = FederationConfig(directory=out / "federation", stores=stores, app=app.resolve(),
                              vocabulary=vocabulary, port=port, insecure=insecure)
    with LocalFederation(config) as running:
        console.print(f"SuperLink on {running.address} ({'insecure' if insecure else 'TLS + node auth'}), "
                      f"{supernodes} SuperNodes online; logs in {running.logs}")
        code = running.run({
            "num-server-rounds": rounds, "min-clients": supernodes, "num-items": log.num_items,
            "dim": 8, "use-context": False, "fraction-evaluate": 0.0, "sample-rate": 1.0,
            "noise-multiplier": 2.0, "update-clip": 1.0, "user-noise-multiplier": 0.8,
            "out-dir": (out / "run").resolve(), "signing-key": running.credentials.signing_key,
            "secure-aggregation": secure_aggregation})
    if code != 0:
        raise AttuneError(f"flwr run exited with {code}; see {config.directory / 'logs'}")
    table = Table(title="federation rounds")
    for column in ("round", "devices trained", "event-level epsilon (max)", "user-level epsilon"):
        table.add_column(column, justify="right")
    for line in (out / "run" / "rounds.jsonl").read_text().splitlines():
        train = json.loads(line)["train"]
        table.add_row(str(json.loads(line)["round"]), f"{train.get('devices-trained', 0):.0f}",
                      f"{train.get('epsilon-max', 0):.2f}", f"{train.get('user-epsilon', 0):.2f}")
    Console().print(table)


def main() -> None:
    try:
        cli()
    except AttuneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
