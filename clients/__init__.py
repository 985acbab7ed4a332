"""The client side: ``Client`` / ``AsyncClient`` (client.py), ``cnnctl predict`` and ``bench``."""

from __future__ import annotations

from cnnctl.clients.client import AsyncClient, Client
from cnnctl.clients.protocol import ModelInfo, Prediction

__all__ = ["AsyncClient", "Client", "ModelInfo", "Prediction"]
