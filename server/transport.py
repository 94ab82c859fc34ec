"""Rounds over Flower's Message API without secure aggregation (``local`` and ``off`` modes): each
device's contribution arrives on its own and is checked before it counts.

A reply that fails a check (decodable, one array named ``contribution``, shape, dtype, finite
values, norm within what an honest device can send) is rejected, counted and logged; the round
goes on with the rest. Replies carry nothing else: no count, loss or metric to trust.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from attune.server.aggregation import combine
from attune.server.coordinator import Collected
from attune.shared.errors import ModelMismatchError
from attune.shared.records import contribution_of, request_content
from attune.shared.wire import RoundRequest, check_contribution

log = logging.getLogger(__name__)
Signer = Callable[[RoundRequest], "str | None"]


class GridTransport:
    """A ``Transport`` over a Flower ``Grid`` (Deployment Engine or simulation)."""

    def __init__(self, grid: Grid, signer: Signer, *, timeout: float | None = None, rule: str = "sum",
                 trim_fraction: float = 0.1) -> None:
        self.grid, self.signer, self.timeout = grid, signer, timeout
        self.rule, self.trim_fraction = rule, trim_fraction

    def devices(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def collect(self, request: RoundRequest, cohort: list[int], min_survivors: int) -> Collected:
        content = request_content(request, self.signer(request))
        messages = [Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                            group_id=str(request.round)) for node in cohort]
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        accepted: list[torch.Tensor] = []
        collected = Collected(total=None, contributors=[], failed=len(cohort) - len(replies))
        for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):  # a fixed order: repeatable sums
            if reply.has_error():
                collected.failed += 1
                continue
            try:
                vector = contribution_of(reply.content)
                if vector is None:
                    collected.refused += 1
                    continue
                accepted.append(check_contribution(vector, request.model, request.config))
            except Exception as error:  # noqa: BLE001 - whatever a device sends, it never stops the run
                reason = str(error) if isinstance(error, ModelMismatchError) else \
                    f"unreadable contribution ({type(error).__name__})"
                collected.rejected += 1
                collected.rejections.append(reason)
                log.warning("rejected the contribution of device %s: %s", reply.metadata.src_node_id, reason)
                continue
            collected.contributors.append(reply.metadata.src_node_id)
        if accepted:
            collected.total = combine(torch.stack(accepted), self.rule, self.trim_fraction)
        return collected
