"""Coordinator side: the Flower ServerApp (``attune.server.app``), the round loop and its transports."""

from attune.server.config import ServerConfig
from attune.server.coordinator import RoundRecord, run

__all__ = ["RoundRecord", "ServerConfig", "run"]
