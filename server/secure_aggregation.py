"""Secure aggregation for a round's training: Flower's SecAgg+ workflow (Bell et al. 2020), so the
coordinator learns only the mean of the sampled devices' updates, never one device's update.

In flwr 1.42 SecAgg+ runs only through the legacy workflow API. This adapter hands the workflow
the round's global model, config and sampled nodes, and takes back the unmasked mean; the rest
of the round (noise, server step, checkpoints) is the coordinator's, as without SecAgg+. Devices
that drop out after sharing their keys are tolerated down to the reconstruction threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from attune.client.secure_aggregation import PARAM_NAMES_KEY


@dataclass(frozen=True)
class SecureAggregationConfig:
    """SecAgg+ parameters. Every coordinate of an update must lie in ``[-clipping_range,
    clipping_range]`` (devices clip their updates far below this); the mean is exact to about
    ``2 * clipping_range / quantization_range`` per coordinate and device."""

    share_fraction: float = 1.0  # of the sampled devices each device shares its secrets with
    threshold_fraction: float = 0.5  # of those shares needed to unmask a dropped device
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    timeout: float | None = None


@dataclass
class _Round:
    """What one secure round hands the workflow and gets back."""

    nodes: list[int]
    fit_ins: FitIns
    mean: list[np.ndarray] | None = None
    metrics: list[dict[str, Scalar]] = field(default_factory=list)
    failures: int = 0


class _RoundStrategy(Strategy):
    """The legacy strategy the workflow calls: the round's instructions in, the mean out."""

    def __init__(self) -> None:
        self.round: _Round | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        assert self.round is not None
        proxies = {int(p.node_id): p for p in client_manager.all().values()}  # type: ignore[attr-defined]
        return [(proxies[node], self.round.fit_ins) for node in self.round.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        assert self.round is not None
        self.round.failures = len(failures)
        self.round.metrics = [res.metrics for _, res in results]
        if results:  # SecAgg+ puts the unmasked aggregate in every result
            self.round.mean = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class SecureAggregation:
    """``mean_update(...)``: one round's training under SecAgg+, returning the mean update."""

    def __init__(self, config: SecureAggregationConfig | None = None) -> None:
        self.config = config or SecureAggregationConfig()
        self._strategy = _RoundStrategy()
        self._context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=self._strategy)

    def mean_update(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    nodes: list[int]) -> tuple[dict[str, np.ndarray] | None, list[dict[str, Scalar]], int]:
        """The unmasked mean of the devices' updates (``None`` if the protocol could not finish),
        the metrics each device reported, and how many devices failed."""
        names = list(arrays.keys())
        fit_config = {**dict(config), PARAM_NAMES_KEY: ",".join(names), "server-round": server_round}
        parameters = ndarrays_to_parameters([arrays[name].numpy() for name in names])
        self._strategy.round = _Round(nodes=nodes, fit_ins=FitIns(parameters, fit_config))
        manager = self._context.client_manager
        for node in nodes:
            if str(node) not in manager.all():
                manager.register(GridClientProxy(node, grid, run_id=0))
        self._context.state.array_records[MAIN_PARAMS_RECORD] = arrays
        self._context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round})
        cfg = self.config
        workflow = SecAggPlusWorkflow(
            num_shares=cfg.share_fraction, reconstruction_threshold=cfg.threshold_fraction,
            max_weight=1.0, clipping_range=cfg.clipping_range, quantization_range=cfg.quantization_range,
            timeout=cfg.timeout)
        try:
            workflow(grid, self._context)
        except ZeroDivisionError:  # every device sent weight 0: nobody trained this round
            self._strategy.round.mean = None
        done = self._strategy.round
        if done.mean is None:
            return None, done.metrics, done.failures
        return dict(zip(names, done.mean, strict=True)), done.metrics, done.failures
