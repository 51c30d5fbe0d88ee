"""pytest plugin for cowbranchd (placeholder while the real one is written)."""

from __future__ import annotations
