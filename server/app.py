"""Flower ServerApp: parses the run config once and hands a transport over the Grid to the
coordinator loop (SecAgg+ when ``secure-aggregation`` is on, plain messages otherwise)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from attune.server.config import ServerConfig
from attune.server.coordinator import RoundCallback, RoundRecord, Transport, run
from attune.server.secure_aggregation import SecureAggregationConfig, SecureTransport
from attune.server.transport import GridTransport
from attune.shared.errors import ConfigError
from attune.shared.signing import load_private_key, sign
from attune.shared.wire import RoundRequest

logging.getLogger("flwr").propagate = False  # opacus's logging setup makes flwr lines print twice
log = logging.getLogger(__name__)


def transport_for(grid: Grid, config: ServerConfig) -> Transport:
    """The transport ``config`` asks for, signing every round with ``config.signing_key``."""
    key = load_private_key(config.signing_key) if config.signing_key is not None else None

    def signer(request: RoundRequest) -> str | None:
        return None if key is None else sign(key, request.arrays(), request.items())

    timeout = config.round_timeout or None
    if config.uses_secure_aggregation:
        return SecureTransport(grid, signer, SecureAggregationConfig(timeout=timeout))
    return GridTransport(grid, signer, timeout=timeout, rule=config.aggregation, trim_fraction=config.trim_fraction)


def deployable(config: ServerConfig) -> ServerConfig:
    """``config`` unless it has a ``noise_seed``: a seed makes the coordinator's sampling and
    device-level noise reproducible to anyone who knows it, which only a simulation may want
    (``attune simulate`` runs its own ServerApp)."""
    if config.noise_seed is not None:
        raise ConfigError("noise-seed is for simulations only: it makes the coordinator's device sampling and "
                          "noise reproducible to anyone who knows it; remove it from the run config")
    return config


def make_server_app(config: ServerConfig | None = None, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp running ``config`` (or, when ``None``, the run config Flower passes in); it
    refuses a ``noise_seed`` (``deployable``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = deployable(config or ServerConfig.parse(context.run_config))
        if settings.signing_key is None:
            log.warning("no signing-key: devices refuse unsigned rounds unless their node config sets "
                        "allow-unsigned=true (local experiments only); create one with `attune credentials`")
        check_progress(run(transport_for(grid, settings), settings, on_round))

    return app


def check_progress(history: list[RoundRecord]) -> None:
    """A run in which no round released a sum made no progress: say why it may be, and fail."""
    if history and not any(r.contributed and not r.aborted for r in history):
        declined = sum(r.refused for r in history)
        failed = sum(r.failed for r in history)
        raise ConfigError(f"no round of this run released a sum ({len(history)} rounds: {declined} declines, "
                          f"{failed} failures); devices decline when their budget is spent, without consent, "
                          "and without a signed round (signing-key); see each round's line above")


app = make_server_app()
