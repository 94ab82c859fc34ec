"""Flower strategy: FedAvg over *updates* of the global side, each validated before it counts.

Devices send the change of the global side; the coordinator aggregates the accepted changes
(``attune.server.aggregation.aggregate``: weighted mean, robust rule, or user-level DP) and
applies the result with its server optimizer. An update that fails validation (names, shapes,
dtype, finite values, model version, undecodable payload, norm over the clip bound) is rejected,
counted and logged; the round goes on with the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from attune.server.aggregation import AggregationConfig, aggregate, noise_secure_mean, server_step
from attune.shared.errors import ModelMismatchError
from attune.shared.model import MODEL_VERSION, ModelConfig
from attune.shared.records import arrays_to_numpy, state_to_arrays
from attune.shared.user_level import update_norm
from attune.shared.wire import check_global_state

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """What happened to the replies of one round."""

    trained: int = 0
    skipped: int = 0
    rejected: int = 0
    failed: int = 0
    rejections: list[str] = field(default_factory=list)


class UpdateFedAvg(FedAvg):
    """FedAvg of validated updates, applied to the current global model by a server step
    (``sgd`` with ``server_lr``, or FedAdam)."""

    def __init__(self, model: ModelConfig, server_lr: float = 1.0, server_optimizer: str = "sgd",
                 aggregation: AggregationConfig | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.model = model
        self.aggregation = aggregation or AggregationConfig()
        self.server = server_step(server_optimizer, server_lr)
        self.current: dict[str, torch.Tensor] | None = None
        self.last_stats = RoundStats()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {name: torch.from_numpy(a) for name, a in arrays_to_numpy(arrays).items()}
        return super().configure_train(server_round, arrays, config, grid)

    def accept(self, msg: Message, stats: RoundStats) -> tuple[dict[str, torch.Tensor], float] | None:
        """The reply's update and weight, or ``None`` (counted in ``stats``) if it does not count."""
        if msg.has_error():
            stats.failed += 1
            return None
        metrics = msg.content.metric_records.get("metrics")
        if metrics is None or "arrays" not in msg.content.array_records:
            stats.skipped += 1
            return None
        weight = float(metrics.get("num-examples", 0))
        try:
            if not np.isfinite(weight) or weight <= 0:
                raise ModelMismatchError(f"num-examples must be positive, got {weight}")
            version = int(metrics.get("model-version", -1))
            update = check_global_state(
                arrays_to_numpy(msg.content.array_records["arrays"]), self.model, version
            )
            bound = self.aggregation.update_clip
            if bound > 0 and (norm := update_norm(update)) > bound * (1 + 1e-5):
                raise ModelMismatchError(f"update norm {norm:.4g} is over the clip bound {bound}")
        except ModelMismatchError as error:
            stats.rejected += 1
            stats.rejections.append(str(error))
            log.warning("rejected update from node %s: %s", msg.metadata.src_node_id, error)
            return None
        stats.trained += 1
        return update, weight

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = RoundStats()
        accepted = []
        metric_rows = []
        # Replies arrive in any order; sorting by content makes float sums (and so runs) repeatable.
        for msg in sorted(replies, key=_reply_key):
            if not msg.has_error() and "metrics" in msg.content.metric_records:
                metric_rows.append(msg.content.metric_records["metrics"])
            result = self.accept(msg, stats)
            if result is not None:
                accepted.append(result)
        mean = aggregate(self.aggregation, server_round, accepted) if accepted else None
        return self._apply(mean, stats, metric_rows)

    def apply_secure_mean(
        self, server_round: int, mean: dict[str, np.ndarray] | None, rows: list[Mapping], failed: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Finish a round whose updates were summed under secure aggregation: only their mean is
        known, so it is validated (names, shapes, finite values) and, with user-level DP, noised."""
        stats = RoundStats(failed=failed)
        trained = sum(1 for row in rows if int(row.get("trained", 0)) == 1)
        stats.skipped = len(rows) - trained
        checked = None
        if mean is not None and trained > 0:
            try:
                checked = check_global_state(
                    {k: np.asarray(v, dtype=np.float32) for k, v in mean.items()}, self.model, MODEL_VERSION)
                stats.trained = trained
            except ModelMismatchError as error:
                stats.rejected, stats.rejections = trained, [str(error)]
                log.warning("rejected the securely aggregated mean: %s", error)
        if checked is None:
            return self._apply(None, stats, rows)
        return self._apply(noise_secure_mean(self.aggregation, server_round, checked, trained), stats, rows)

    def _apply(
        self, mean: dict[str, torch.Tensor] | None, stats: RoundStats, rows: list[Mapping]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the round's mean update with the server optimizer; the round's metrics."""
        if self.current is None:
            raise RuntimeError("aggregation called before configure_train")
        self.last_stats = stats
        metrics = MetricRecord(
            {
                "devices-trained": stats.trained,
                "devices-skipped": stats.skipped,
                "devices-rejected": stats.rejected,
                "devices-failed": stats.failed,
                **_privacy_metrics(rows),
            }
        )
        if mean is None:
            return None, metrics
        new_state = self.server.step(self.current, mean)
        losses = [(float(m["loss"]), float(m["num-examples"])) for m in rows if "loss" in m]
        if losses:
            metrics["loss"] = sum(value * w for value, w in losses) / sum(w for _, w in losses)
        return state_to_arrays(new_state), metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        counted = [
            msg for msg in replies
            if not msg.has_error()
            and float(msg.content.metric_records["metrics"].get("num-examples", 0)) > 0
        ]
        return super().aggregate_evaluate(server_round, counted) if counted else None


def _reply_key(msg: Message) -> tuple:
    if msg.has_error() or "metrics" not in msg.content.metric_records:
        return (1,)
    metrics = msg.content.metric_records["metrics"]
    return (0, *(float(metrics.get(k, 0.0)) for k in ("num-examples", "loss", "epsilon", "steps")))


def _privacy_metrics(rows: list[Mapping]) -> dict[str, float]:
    """Max and mean epsilon over the devices that replied, and the max device's accounting."""
    eps = [(float(m["epsilon"]), m) for m in rows if "epsilon" in m]
    if not eps:
        return {}
    top_eps, top = max(eps, key=lambda pair: pair[0])
    out = {
        "epsilon-max": top_eps,
        "epsilon-mean": sum(e for e, _ in eps) / len(eps),
        "steps-max": float(top.get("steps", 0)),
    }
    if "sample-rate" in top:
        out["sample-rate-max"] = float(top["sample-rate"])
    return out
