"""A Flower federation on one machine, for local experiments, the ``attune federation`` command,
``attune simulate --backend flower`` and tests (not part of a deployment): a SuperLink, then either
N SuperNodes (the Deployment Engine, each pointing at its own device store) or N virtual ones
(the SuperLink's simulation runtime), and ``flwr run`` of an Attune app.

Everything here drives Flower's own executables (``flower-superlink``, ``flower-supernode``,
``flwr``); Attune adds no network code. TLS and SuperNode authentication are on unless
``insecure`` is set; runtime dependency installation and telemetry are off. Every process is
started in its own session and stopped (with its children) by ``stop()``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from attune.server.credentials import Credentials, create_credentials
from attune.shared.errors import ConfigError
from attune.shared.signing import generate_keypair

log = logging.getLogger(__name__)
CONNECTION = "attune-local"
MARKER = "ATTUNE_FEDERATION"


@dataclass(frozen=True)
class FederationConfig:
    """``directory`` receives credentials, Flower's home (``FLWR_HOME``) and logs. With
    ``simulated_devices`` the SuperLink runs Flower's simulation runtime over that many virtual
    SuperNodes (the app finds each device's store by its ``partition-id``) instead of ``stores``."""

    directory: Path
    stores: tuple[Path, ...]
    app: Path  # the Flower App directory (this project's pyproject.toml)
    vocabulary: Path | None = None
    host: str = "127.0.0.1"
    port: int = 18000  # 0: a free port
    insecure: bool = False
    node_config: dict[str, str | int | float | bool] = field(default_factory=dict)
    simulated_devices: int = 0

    def __post_init__(self) -> None:
        if not self.stores and not self.simulated_devices:
            raise ConfigError("a federation needs at least one device store")
        if self.stores and self.simulated_devices:
            raise ConfigError("a federation runs either SuperNodes over stores or simulated devices, not both")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not a TCP port (1 to 65535, or 0 for a free one)")
        if not (self.app / "pyproject.toml").is_file():
            raise ConfigError(f"{self.app} is not a Flower App directory (no pyproject.toml)")


def _config_value(value: str | int | float | bool | Path) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return f"'{value}'"
    return repr(value)


def format_config(values: dict[str, str | int | float | bool | Path]) -> str:
    """``key=value`` pairs as Flower's ``--run-config`` and ``--node-config`` read them."""
    return " ".join(f"{key}={_config_value(value)}" for key, value in values.items())


class LocalFederation:
    """Start with ``with LocalFederation(config) as federation:``; every process stops on exit."""

    def __init__(self, config: FederationConfig) -> None:
        self.config = config
        self.port = config.port or _free_port(config.host)
        self.directory = config.directory.resolve()  # Flower's processes get absolute paths
        self.credentials = Credentials(self.directory / "credentials")
        self.logs = self.directory / "logs"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self._runs: list[subprocess.Popen] = []
        bin_dir = str(Path(sys.executable).parent)  # flower-superlink needs flower-superexec on PATH
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "FLWR_HOME": str(self.directory / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    # inherited by every process Flower spawns, even in new sessions: how stop() finds them
                    MARKER: str(self.directory)}

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as out:
            return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                              check=check, timeout=300)

    def start(self) -> None:
        config, creds = self.config, self.credentials
        if config.insecure:
            creds.directory.mkdir(parents=True, exist_ok=True)
            generate_keypair(creds.signing_key, creds.verify_key)
        else:
            create_credentials(creds.directory, [config.host], len(config.stores))
        self._write_flower_config()
        security = ["--insecure"] if config.insecure else [
            "--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
            "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth"]
        self.superlink = self._spawn("superlink", [
            "flower-superlink", *security, "--disable-runtime-dependency-installation",
            *(["--simulation"] if config.simulated_devices else []),
            "--host", config.host, "--port", str(self.port),
            "--database", str(self.directory / "superlink.db")])
        _wait_for_port(config.host, self.port, self.superlink)
        for index in range(len(config.stores)):
            if not config.insecure:
                self.flwr("supernode", "register", str(creds.supernode_public_key(index)), CONNECTION)
            self.supernodes.append(self._start_supernode(index))
        if config.stores:
            self.wait_online(len(config.stores))

    def _write_flower_config(self) -> None:
        home = self.directory / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        security = ("insecure = true" if self.config.insecure
                    else f'root-certificates = "{self.credentials.ca_cert}"')
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n{security}\n')

    def _start_supernode(self, index: int) -> subprocess.Popen:
        config = self.config
        node_config: dict = {"store-path": config.stores[index].resolve(),
                             "coordinator-public-key": self.credentials.verify_key,
                             **config.node_config}
        if config.vocabulary is not None:
            node_config["vocabulary-path"] = config.vocabulary.resolve()
        security = ["--insecure"] if config.insecure else [
            "--root-certificates", str(self.credentials.ca_cert),
            "--auth-supernode-private-key", str(self.credentials.supernode_key(index))]
        return self._spawn(f"supernode-{index}", [
            "flower-supernode", *security, "--superlink", self.address,
            "--host", config.host, "--port", str(_free_port(config.host)),
            "--node-config", format_config(node_config)])

    def online_nodes(self) -> int:
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json", check=False)
        try:
            nodes = json.loads(result.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_online(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes came online; see {self.logs}")
            time.sleep(1.0)

    def start_run(self, run_config: dict[str, str | int | float | bool | Path]) -> subprocess.Popen:
        """``flwr run`` of the app with ``run_config`` (streams the run's log until it ends)."""
        simulation = []
        if self.config.simulated_devices:  # each ClientApp takes one core: as many at once as there are cores
            simulation = ["--federation-config", format_config({
                "num-supernodes": self.config.simulated_devices, "client-resources-num-cpus": 1,
                "client-resources-num-gpus": 0.0, "init-args-log-to-driver": False})]
        run = self._spawn(f"run-{len(self._runs)}", [
            "flwr", "run", str(self.config.app), CONNECTION, "--stream", *simulation,
            *(["--run-config", format_config(run_config)] if run_config else [])])
        self._runs.append(run)
        return run

    def run(self, run_config: dict[str, str | int | float | bool | Path], timeout: float = 1800) -> int:
        run = self.start_run(run_config)
        return run.wait(timeout=timeout)

    def stop_run(self, run_id: int) -> None:
        """``flwr stop``: the SuperLink cancels the run's pending messages."""
        self.flwr("stop", str(run_id), CONNECTION, check=False)

    def run_ids(self) -> list[int]:
        """Ids of the SuperLink's runs, from ``flwr ls --format json``."""
        result = self.flwr("ls", CONNECTION, "--format", "json", check=False)
        try:
            runs = json.loads(result.stdout).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            return []
        return [int(run.get("run-id") or run.get("run_id") or 0) for run in runs if isinstance(run, dict)]

    def kill_supernode(self, index: int) -> None:
        """SIGKILL one SuperNode and its ClientApp processes (a device vanishing mid-round)."""
        process = self.supernodes[index]
        if process is not None:
            os.killpg(process.pid, signal.SIGKILL)  # no goodbye to the SuperLink: a crash
            process.wait(timeout=10)
            self.supernodes[index] = None

    def processes(self, command: str = "") -> list[int]:
        """Live processes of this federation (found by the marker in their environment)."""
        return marked_processes(f"{MARKER}={self.env[MARKER]}", command)

    def kill_serverapp(self) -> int:
        """SIGKILL the running ServerApp process(es) of this SuperLink; returns how many."""
        pids = self.processes("flwr-serverapp")
        for pid in pids:
            _kill(pid)
        return len(pids)

    def stop(self) -> None:
        """Stop every process this federation started (runs, SuperNodes, SuperLink) and every
        process Flower started for it (SuperExec, ServerApp, ClientApps)."""
        for process in [*self._runs, *self.supernodes, self.superlink]:
            if process is not None:
                _kill_group(process)
        for pid in self.processes():
            _kill(pid)
        self._runs, self.supernodes, self.superlink = [], [], None


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    try:  # children that outlived their parent (same session)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def marked_processes(marker: str, command: str = "") -> list[int]:
    """Pids whose environment holds ``marker`` and whose command line holds ``command`` (Linux)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                if marker.encode() in environ and command.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"flower-superlink exited with code {process.returncode}; see its log")
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the SuperLink did not open {host}:{port} within {timeout:.0f} s")
