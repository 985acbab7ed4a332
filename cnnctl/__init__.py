"""cnnctl: train the classic CNNs, export verified artifacts, serve them over KServe v2 gRPC."""

from __future__ import annotations

__version__ = "0.1.0"
