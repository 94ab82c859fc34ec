"""The ``attune`` command: ``simulate``, ``demo``, ``sweep``, ``audit``, ``credentials`` and
``federation``. Flags are parsed here and nowhere else; ``simulate``'s options are built from the
config dataclasses (``attune.simulations.options``)."""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from attune.shared.errors import AttuneError

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Attune: private on-device personalization with federated learning.")
console = Console(stderr=True)


def _folder(value: str) -> Path:
    """An output path: an empty one would write into the current folder unasked."""
    if not str(value).strip():
        raise typer.BadParameter("is empty; name the output path")
    return Path(value)


def _out(default: str, help: str = "output folder") -> Path:  # noqa: A002 - typer's name
    return typer.Option(Path(default), parser=_folder, metavar="PATH", help=help)


def _run(config, label: str = "") -> dict:  # noqa: ANN001 - a SimulationConfig
    """Run one simulation with progress: a bar on a terminal, one plain line per round otherwise."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attune.server.planning import planned_evaluations
    from attune.simulations.runner import quiet_third_parties, simulate

    quiet_third_parties()
    log = config.source.load(config.server.seed)  # bad input fails here, before any progress is drawn
    rounds = config.server.rounds + len(planned_evaluations(config.server))
    if not console.is_terminal:
        def plain(record, metrics) -> None:  # noqa: ANN001
            hr = f"  HR@10 {metrics['hr@10']:.4f}" if "hr@10" in metrics else ""
            if record.evaluation is not None:
                hr = (f"  federated HR@10 {record.evaluation['hr']:.4f} ± {record.evaluation['hr_half_width']:.4f} "
                      "(DP estimate)")
            print(f"{label}round {record.round}/{rounds} ({record.task}): {record.contributed} devices, epsilon "
                  f"{record.epsilon:.3f}{hr}", file=sys.stderr, flush=True)

        results = simulate(config, plain, log, lambda text: print(f"{label}{text}", file=sys.stderr, flush=True))
    else:
        with Progress(TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(),
                      TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("preparing devices", total=rounds)
            last = {"hr": float("nan")}

            def on_round(record, metrics) -> None:  # noqa: ANN001
                last["hr"] = metrics.get("hr@10", last["hr"])
                bar.update(task, advance=1, description=f"HR@10 {last['hr']:.3f}  epsilon {record.epsilon:.2f}")

            results = simulate(config, on_round, log, lambda text: bar.update(task, description=text))
    _print_table(results, config.out)
    return results


def _print_table(results: dict, out: Path) -> None:
    from attune.simulations.watch import interval

    table = Table(title=f"{results['dataset']['name']}: {results['label']}")
    for column in ("round", "HR@10", "NDCG@10", "devices", "epsilon (max device)"):
        table.add_column(column, justify="right")
    for row in results["rounds"]:
        epsilon = "-" if row["epsilon"] is None else f"{row['epsilon']:.3f}"
        if row["hr@10"] is not None:
            table.add_row(str(row["round"]), f"{row['hr@10']:.4f}", f"{row['ndcg@10']:.4f}", str(row["contributed"]),
                          epsilon)
        elif row["evaluation"] is not None:  # the coordinator's DP estimate of the round before
            estimate = row["evaluation"]
            table.add_row(f"{row['round']} (DP est.)", interval(estimate, "hr"), interval(estimate, "ndcg"),
                          str(row["contributed"]), epsilon)
    pop = results["baseline"]["popular"]
    table.add_row("popular", f"{pop['hr@10']:.4f}", f"{pop['ndcg@10']:.4f}", "", "")
    Console().print(table)
    privacy = results["privacy"]
    if results["private"]:
        Console().print(f"{privacy['mode']}: epsilon {privacy['epsilon']:.3f} (delta {privacy['delta']:g}); "
                        f"one device's contributions alone: epsilon {privacy['epsilon_local']:.3f}")
    Console().print(f"results: {out / 'results.json'}  curve: {out / 'curve.png'}")


def _simulate(out: Path = _out("runs/simulate"),
              no_dp: bool = typer.Option(False, "--no-dp", help="the same as --mode off: NO privacy"),
              **options: object) -> None:
    """Federated simulation: one virtual device per user, the same coordinator loop and device round
    as a deployment (fast: in-process; flower: ``flwr run`` of the real apps in Flower's simulation
    runtime)."""
    from attune.simulations.options import build

    if no_dp:
        options["mode"] = "off"
    _run(build(options, out=out))


def _register(name: str, function, *, data_only: bool = False) -> None:  # noqa: ANN001
    """``function``'s own options, then those generated from the config dataclasses."""
    from attune.simulations.options import with_options

    own = [p for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD]
    cli.command(name=name)(with_options(function, own, data_only=data_only))


_register("simulate", _simulate)

# What real SecAgg+ in Flower's simulation runtime runs in about 5 minutes on 2 cores.
DEMO = {"rounds": 30}


@cli.command()
def demo(out: Path = _out("runs/demo"), seed: int = typer.Option(0)) -> None:
    """A few-minute federated run on the built-in synthetic data: distributed DP (epsilon 8), the
    real ServerApp and ClientApps run by ``flwr run`` in Flower's simulation runtime, every round
    through SecAgg+."""
    from attune.simulations.options import build

    _run(build({**DEMO, "seed": seed, "backend": "flower"}, out=out))


def _list(text: str, parse) -> tuple:  # noqa: ANN001
    try:
        return tuple(parse(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise AttuneError(f"cannot read the list {text!r}: {error}") from None


def _sweep(
    modes: str = typer.Option("distributed,local", help="privacy modes"),
    algorithms: str = typer.Option("partial-local,ditto,global"),
    epsilons: str = typer.Option("1,2,4,8,none", help="per-device epsilons; none = no DP"),
    seeds: str = typer.Option("0,1"),
    rounds: int | None = typer.Option(None, help="default: each mode's preset"),
    out: Path = _out("runs/sweep"),
    **data: object,
) -> None:
    """Privacy/utility sweep on the fast backend: modes x algorithms x epsilon x seeds, a table
    (CSV and JSON, mean and std over seeds) and a plot of HR@10 against epsilon."""
    from attune.simulations.options import data_source
    from attune.simulations.sweep import SweepConfig, run_sweep

    grid = SweepConfig(source=data_source(data), modes=_list(modes, str),
                       algorithms=_list(algorithms, str),
                       epsilons=_list(epsilons, lambda v: None if v.lower() == "none" else float(v)),
                       seeds=_list(seeds, int), rounds=rounds, out=out)
    total = grid.cells()
    done = [0]

    def on_cell(cell: dict) -> None:
        done[0] += 1
        console.print(f"[{done[0]}/{total}] {cell['mode']} {cell['algorithm']} epsilon={cell['epsilon']} "
                      f"seed={cell['seed']}: HR@10 {cell['hr@10']:.4f}")

    rows = run_sweep(grid, on_cell)
    table = Table(title=f"sweep: HR@10 (mean ± std over {len(grid.seeds)} seeds)")
    ran = sorted({r["epsilon"] for r in rows if r["epsilon"] != "no DP"}) + \
        (["no DP"] if any(r["epsilon"] == "no DP" for r in rows) else [])
    for column in ("mode", "algorithm", *[f"epsilon {e}" if e != "no DP" else e for e in ran]):
        table.add_column(column)
    cells = {(r["mode"], r["algorithm"], r["epsilon"]): f"{r['hr@10_mean']:.3f} ± {r['hr@10_std']:.3f}" for r in rows}
    for mode in dict.fromkeys(r["mode"] for r in rows):  # each value under its own epsilon, "-" where none ran
        for algorithm in grid.algorithms:
            table.add_row(mode, algorithm, *(cells.get((mode, algorithm, e), "-") for e in ran))
    Console().print(table)
    Console().print(f"table: {out / 'sweep.csv'}  plot: {out / 'sweep.png'}")


_register("sweep", _sweep, data_only=True)


@cli.command()
def audit(
    dataset: str = typer.Option("synthetic", help="synthetic or movielens"),
    data: Path | None = typer.Option(None, help="ml-100k folder (u.data)"),
    noise_multiplier: float = typer.Option(1.0, help="noise multiplier of the audited round"),
    no_dp: bool = typer.Option(False, "--no-dp", help="audit a round WITHOUT privacy"),
    users: int = typer.Option(1000, help="synthetic: devices (each audited with one canary)"),
    seed: int = typer.Option(0),
    out: Path = _out("runs/audit.json", "output file"),
) -> None:
    """Empirical privacy audit with one training run (Steinke, Nasr, Jagielski 2023): canary
    events in half the devices, membership guesses from the contributions the coordinator would
    see in local mode, an epsilon lower bound beside the accounted epsilon and the largest epsilon
    this run could certify."""
    from attune.simulations.audit import audit as run_audit
    from attune.simulations.evaluation import leave_one_out
    from attune.simulations.runner import DataSource

    log = DataSource(dataset=dataset, path=data, synthetic_users=users).load(seed)
    result = run_audit(log, leave_one_out(log, seed=seed), noise_multiplier=None if no_dp else noise_multiplier,
                       seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": log.name, "private": not no_dp, **result.as_dict()}, indent=2))
    accounted = "none (no DP)" if result.epsilon_accounted is None else f"{result.epsilon_accounted:.2f}"
    Console().print(f"{result.correct}/{result.guesses} membership guesses correct over {result.canaries} canaries: "
                    f"epsilon lower bound {result.epsilon_lower_bound:.2f} ({result.confidence:.0%} confidence; "
                    f"the most this run could certify: {result.epsilon_certifiable:.2f}), accounted epsilon "
                    f"{accounted}. -> {out}")


@cli.command()
def credentials(
    out: Path = _out("deploy/credentials"),
    host: list[str] = typer.Option(["127.0.0.1"], help="SuperLink host name or IP (repeatable)"),
    supernodes: int = typer.Option(3, help="SuperNode key pairs to create"),
) -> None:
    """Create a deployment's credentials: TLS CA and SuperLink certificate, SuperNode keys,
    and the coordinator's round-signing key."""
    from attune.server.credentials import create_credentials

    if supernodes < 1:
        raise AttuneError("--supernodes must be at least 1")
    creds = create_credentials(out, host, supernodes)
    Console().print(f"credentials in {creds.directory}: CA {creds.ca_cert.name}, SuperLink "
                    f"{creds.server_cert.name}/{creds.server_key.name}, SuperNode keys supernode_<i>"
                    f"(.pub), signing key {creds.signing_key.name} (devices get {creds.verify_key.name})")


@cli.command()
def federation(
    supernodes: int = typer.Option(3, help="SuperNodes, each with its own device store"),
    rounds: int = typer.Option(3),
    out: Path = _out("runs/federation"),
    port: int = typer.Option(18000, min=1, max=65535, help="SuperLink port on 127.0.0.1"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS and no SuperNode authentication "
                                  "(local experiments only)"),
    app: Path = typer.Option(Path("."), help="the Attune project directory (its pyproject.toml)"),
    mode: str = typer.Option("distributed", help="distributed (SecAgg+), local or off"),
) -> None:
    """A Deployment Engine federation on this machine: SuperLink + SuperNodes on synthetic device
    stores, `flwr run` of the Attune app, then every process is stopped."""
    from attune.simulations.datasets import synthetic
    from attune.simulations.devices import store_path, write_devices
    from attune.simulations.evaluation import leave_one_out
    from attune.simulations.federation import FederationConfig, LocalFederation

    if supernodes < 2 or rounds < 2:
        raise AttuneError("--supernodes must be at least 2 and --rounds at least 2 (round 1 counts the items)")
    stores = tuple(store_path(out / "devices", user) for user in range(supernodes))
    config = FederationConfig(directory=out / "federation", stores=stores, app=app.resolve(),
                              port=port, insecure=insecure)  # checked before anything is written
    log = synthetic(num_users=max(supernodes, 10), seed=0)
    config = replace(config, vocabulary=write_devices(log, leave_one_out(log), out / "devices"))
    with LocalFederation(config) as running:
        console.print(f"SuperLink on {running.address} ({'insecure' if insecure else 'TLS + node auth'}), "
                      f"{supernodes} SuperNodes online; logs in {running.logs}")
        code = running.run({
            "num-server-rounds": rounds, "min-devices": supernodes, "num-items": log.num_items, "dim": 8,
            "use-context": False, "mode": mode, "target-epsilon": 8.0 if mode != "off" else 0.0,
            "secure-aggregation": mode == "distributed",
            "out-dir": (out / "run").resolve(), "signing-key": running.credentials.signing_key})
    if code != 0 or not (out / "run" / "rounds.jsonl").is_file():  # flwr run exits 0 when the ServerApp fails
        raise AttuneError(f"the run recorded no round (flwr run exited with {code}); see {config.directory / 'logs'}")
    table = Table(title="federation rounds")
    for column in ("round", "devices contributed", "event-level epsilon (max device)"):
        table.add_column(column, justify="right")
    for line in (out / "run" / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        table.add_row(str(record["round"]), str(record["contributed"]), f"{record['epsilon']:.2f}")
    Console().print(table)


@cli.command("check-node")
def check_node(node_config: str = typer.Argument(..., help="the SuperNode's --node-config, as given to it")) -> None:
    """Check a SuperNode's node config before starting it (Flower runs the ClientApp only when a
    round arrives): keys, the store and its key, the vocabulary, the coordinator's public key."""
    from flwr.common.config import parse_config_args

    from attune.client.settings import DeviceSettings

    try:
        parsed = parse_config_args([node_config])
    except Exception as error:  # noqa: BLE001 - Flower's parser raises click's and TOML's errors
        raise AttuneError(f"the node config does not parse as Flower reads it: {error}") from None
    for line in DeviceSettings.from_node_config(parsed).check():
        Console().print(f"ok  {line}")


runs = typer.Typer(no_args_is_help=True, help="Watch a run: its rounds.jsonl as a table and a plot.")
cli.add_typer(runs, name="runs")


@runs.command("show")
def show(
    run_dir: Path = typer.Argument(..., help="the run's out-dir (deployment) or --out folder (simulation)"),
    follow: bool = typer.Option(False, "--follow", help="keep printing rounds as they are recorded (Ctrl-C stops)"),
    plot: Path | None = typer.Option(None, help="where the plot goes [RUN_DIR/rounds.png]"),
    seconds: float = typer.Option(0.0, "--for", help="with --follow: stop after this many seconds (0: never)",
                                  min=0.0),
) -> None:
    """The run's rounds as the coordinator saw them: cohort, contributions, declines (devices never
    say why), the coordinator's rejections and their reasons, aborted rounds and why, epsilon spent,
    and the noised evaluation with its 95% interval; and a plot of them."""
    import time

    from attune.simulations import watch

    path = watch.rounds_file(run_dir)
    records = watch.read_rounds(path)
    out = Console() if Console().is_terminal else Console(width=140)  # a file or a pipe gets whole cells
    out.print(watch.table(records, f"rounds of {path.parent}"))
    for reason, count in watch.rejections(records).most_common():
        out.print(f"rejected {count}x: {reason}")
    if follow:
        started = time.monotonic()
        try:
            while not seconds or time.monotonic() - started < seconds:
                time.sleep(1.0)
                fresh = watch.read_rounds(path)
                for record in fresh[len(records):]:
                    out.print("  ".join(f"{name} {cell}" for name, cell in
                                              zip(watch.COLUMNS, watch.row(record), strict=True) if cell))
                records = fresh
        except KeyboardInterrupt:
            pass
    target = watch.plot(records, plot or path.parent / "rounds.png")
    out.print(f"plot: {target}")


def main(argv: list[str] | None = None) -> None:
    """The ``attune`` console script: ``argv`` (default: the command line), Attune's and the
    system's errors as one line and exit code 2."""
    try:
        cli(args=argv, prog_name="attune")
    except AttuneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a path that cannot be written, a port in use: one line, no traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
