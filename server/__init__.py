"""Coordinator side: the Flower ServerApp (``app``), round loop, strategy and checkpoints."""

from attune.server.config import ServerConfig

__all__ = ["ServerConfig"]
