"""Risoluto hardening kernel: a small Quart kernel with pluggy hooks for every checklist item."""

from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl
from .settings import Settings

__version__ = "0.1.0"
__all__ = ["hookimpl", "create_app", "Settings", "__version__"]


def create_app(settings: Settings, **kwargs: Any) -> Any:
    """Build a Quart app with its own plugin manager (see :mod:`risoluto.app`)."""
    from .app import create_app as _create_app

    return _create_app(settings, **kwargs)
