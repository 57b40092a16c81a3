"""tpconf: Telepresence 1 made declarative, multi-service, crash-safe and fast."""

from __future__ import annotations

__version__ = "0.1.0"
