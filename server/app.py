"""Flower ServerApp: parses the run config once and hands the Grid to the coordinator loop."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from attune.server.config import ServerConfig
from attune.server.coordinator import RoundCallback, run

logging.getLogger("flwr").propagate = False  # opacus's logging setup makes flwr lines print twice


def make_server_app(config: ServerConfig | None = None, on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp running ``config`` (or, when ``None``, the run config Flower passes in)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, config or ServerConfig.from_run_config(context.run_config), on_round)

    return app


app = make_server_app()
