"""The client side: ``Client`` / ``AsyncClient`` (client.py), ``cnnctl predict|bench|demo``.

``from cnnctl.clients import Client`` works, but loads grpc and numpy only on first use: every
``cnnctl`` command imports this package (cli.py), and ``cnnctl --help`` must stay instant.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"Client": "client", "AsyncClient": "client", "ModelInfo": "protocol",
         "Prediction": "protocol"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"cnnctl.clients.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'cnnctl.clients' has no attribute {name!r}")


__all__ = list(_LAZY)
