"""Secure aggregation for a round: Flower's SecAgg+ workflow (Bell et al. 2020), hardened, so the
coordinator learns only the sum of the sampled devices' contributions.

In flwr 1.42 SecAgg+ runs only through the legacy workflow API. This transport hands the workflow
the round's signed global side and config and the sampled devices, and takes back the exact
integer sum. Creating it calls ``harden()``, which puts Attune's mask generator and exact integer
decoding into Flower's workflow (``attune.shared.secure_sum``) after checking the Flower release;
devices do the same on their side. The workflow is also stopped before it unmasks anything when
fewer than ``min_survivors`` devices' vectors are in the sum (it never releases an under-noised
sum), and the cohort is capped so the sum cannot wrap around the field. Shares go to
``O(log n)`` neighbours (SecAgg+'s sparse graph), at least ``2 * colluders + 1``, with a threshold
of a strict majority over ``colluders`` (``secure_sum.neighbourhood``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation import secaggplus_workflow as flower_workflow
from flwr.serverapp import Grid

from attune.server.coordinator import Collected
from attune.shared import secure_sum
from attune.shared.errors import ModelMismatchError
from attune.shared.mechanism import contribution_dim
from attune.shared.records import request_content
from attune.shared.wire import RoundRequest, check_contribution

log = logging.getLogger(__name__)


def harden() -> None:
    """Replace the weak pieces of Flower's server-side SecAgg+ with Attune's (idempotent; checked
    against the Flower release they were written for). The app factories call it."""
    secure_sum.check_flower_version()
    workflow: Any = flower_workflow  # Flower's internals, replaced by callables of the same arity
    workflow.pseudo_rand_gen = secure_sum.mask_stream
    workflow.combine_shares = secure_sum.combine_shares
    workflow.dequantize = lambda residues, clipping_range, target_range: secure_sum.decode(residues)
    workflow.factor_extract = lambda parameters: (1, parameters[1:])  # every weight is 1: no division



@dataclass(frozen=True)
class SecureAggregationConfig:
    """How long a SecAgg+ stage waits for devices. The graph (shares and threshold) follows from
    the cohort and the round's ``colluders`` (``secure_sum.neighbourhood``)."""

    timeout: float | None = None


@dataclass
class _Round:
    nodes: list[int]
    fit_ins: FitIns
    total: np.ndarray | None = None
    contributors: list[int] = field(default_factory=list)
    failures: int = 0


class _RoundStrategy(Strategy):
    """The legacy strategy the workflow calls: the round's instructions in, the sum out."""

    def __init__(self) -> None:
        self.round: _Round | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        assert self.round is not None
        proxies = {int(p.node_id): p for p in client_manager.all().values()}
        return [(proxies[node], self.round.fit_ins) for node in self.round.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        assert self.round is not None
        self.round.failures = len(failures)
        self.round.contributors = [int(proxy.node_id) for proxy, _ in results]
        if results:  # SecAgg+ puts the unmasked sum in every result
            self.round.total = parameters_to_ndarrays(results[0][1].parameters)[0]
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


class _MaskedVectorsChecked:
    """The grid as the collect stage sees it: a reply whose masked vector is not the round's
    ``[weight (1,), contribution (dim,)]`` of integers, or cannot be read, is left out, so that
    device counts as dropped (its masks are removed at unmasking) instead of breaking the sum."""

    def __init__(self, grid: Grid, dim: int) -> None:
        self.grid, self.dim = grid, dim

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201 - Grid's signature
        kept = []
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error() or self._fits(reply):
                kept.append(reply)
            else:
                log.warning("dropping device %s from the secure round: its masked vector is not the round's",
                            reply.metadata.src_node_id)
        return kept

    def _fits(self, reply) -> bool:  # noqa: ANN001
        try:
            masked = reply.content.config_records[RECORD_KEY_CONFIGS][SecAggKey.MASKED_PARAMETERS]
            arrays = [bytes_to_ndarray(b) for b in masked]
        except Exception:  # noqa: BLE001 - anything unreadable is a device's fault, never the round's
            return False
        return [a.shape for a in arrays] == [(1,), (self.dim,)] and all(a.dtype.kind in "iu" for a in arrays)


class _Workflow(SecAggPlusWorkflow):
    """SecAgg+ that stops before unmasking when too few devices' vectors are in the sum, that
    does not try to rebuild the masks of a device that left before sharing its keys (Flower 1.42
    keeps it among the sampled devices, finds no shares for it, and halts the whole round), and
    that drops a device whose masked vector has the wrong shape (it broke the whole sum)."""

    def __init__(self, min_survivors: int, dim: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.min_survivors, self.dim = min_survivors, dim
        self.stopped = ""

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        checked = cast(Grid, _MaskedVectorsChecked(grid, self.dim))  # a proxy: the one method the stage calls
        return super().collect_masked_vectors_stage(checked, context, state)

    def share_keys_stage(self, grid, context, state) -> bool:
        done = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)  # only these shared keys and masked with others
        return done

    def unmask_stage(self, grid, context, state) -> bool:
        if len(state.active_node_ids) < self.min_survivors:
            self.stopped = (f"{len(state.active_node_ids)} devices' vectors in the sum, fewer than "
                            f"min_survivors={self.min_survivors}: not unmasked")
            log.warning("secure round stopped: %s", self.stopped)
            return False
        return super().unmask_stage(grid, context, state)


class SecureTransport:
    """A ``Transport`` over a Flower ``Grid`` whose rounds go through hardened SecAgg+."""

    def __init__(self, grid: Grid, signer, config: SecureAggregationConfig | None = None) -> None:  # noqa: ANN001
        harden()
        self.grid, self.signer = grid, signer
        self.config = config or SecureAggregationConfig()
        self._strategy = _RoundStrategy()
        self._context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            strategy=self._strategy)

    def devices(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def collect(self, request: RoundRequest, cohort: list[int], min_survivors: int) -> Collected:
        limit = secure_sum.max_cohort(request.model, request.config)
        if len(cohort) > limit:
            return Collected(None, [], failed=len(cohort),
                             aborted=f"a cohort of {len(cohort)} could overflow the secure sum (at most {limit})")
        if len(cohort) < max(2, min_survivors):
            return Collected(None, [], failed=len(cohort),
                             aborted=f"{len(cohort)} devices sampled, fewer than {max(2, min_survivors)}")
        content = request_content(request, self.signer(request))
        config = cast(dict[str, Scalar], dict(content.config_records["config"]))  # the round config: scalars only
        parameters = ndarrays_to_parameters(list(request.arrays().values()))  # in layout order
        self._strategy.round = _Round(nodes=cohort, fit_ins=FitIns(parameters, config))
        manager = self._context.client_manager
        for node in cohort:
            if str(node) not in manager.all():
                manager.register(GridClientProxy(node, self.grid, run_id=0))
        self._context.state.array_records[MAIN_PARAMS_RECORD] = content.array_records["arrays"]
        self._context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: request.round})
        shares, threshold = secure_sum.neighbourhood(len(cohort), request.config.colluders)
        workflow = _Workflow(
            min_survivors, contribution_dim(request.model, request.config),
            num_shares=shares if shares < len(cohort) else 1.0, reconstruction_threshold=threshold,
            max_weight=secure_sum.MAX_WEIGHT, clipping_range=secure_sum.CLIPPING_RANGE,
            quantization_range=secure_sum.QUANTIZATION_RANGE, modulus_range=secure_sum.MODULUS,
            timeout=self.config.timeout)
        workflow(self.grid, self._context)
        done = self._strategy.round
        missing = len(cohort) - len(done.contributors)
        if done.total is None:
            return Collected(None, [], failed=missing, aborted=workflow.stopped or "the secure round did not finish")
        try:
            total = check_contribution(torch.from_numpy(np.rint(done.total).astype(np.int64)),
                                       request.model, request.config, devices=len(done.contributors))
        except ModelMismatchError as error:
            log.warning("refusing the round's secure sum: %s", error)
            return Collected(None, [], rejected=len(done.contributors), failed=missing, aborted=str(error),
                             rejections=[str(error)])
        return Collected(total=total, contributors=done.contributors, failed=missing)
