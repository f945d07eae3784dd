"""The per-app kernel object handed to plugins: settings, hooks and shared services."""

from __future__ import annotations

import os
from typing import Any, Mapping

import pluggy
from prometheus_client import CollectorRegistry

from .hooks import Hooks
from .hookspecs.ratelimit import RateLimiter, RateRule
from .hookspecs.sandbox import SandboxRuntime
from .hookspecs.secrets import SecretStore
from .manager import PluginInfo, build_plugin_manager
from .settings import Settings


class Kernel:
    """One per app. Plugins keep their per-app state here, never in module globals.

    ``settings`` may be replaced at run time by the config overlay API; read it per use.
    """

    def __init__(
        self,
        settings: Settings,
        extra_plugins: tuple[tuple[str, Any], ...] = (),
        environ: Mapping[str, str] | None = None,
    ):
        self.settings = settings
        self.environ: Mapping[str, str] = dict(os.environ if environ is None else environ)
        pm, infos = build_plugin_manager(settings.plugins.disable, extra_plugins)
        self.pm: pluggy.PluginManager = pm
        self.plugins: list[PluginInfo] = infos
        self.hooks = Hooks(pm)
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.secret_store: SecretStore | None = None
        self.secrets_locked_reason = "no master key: set MASTER_KEY or create <DATA_DIR>/master.key"
        self.limiter: RateLimiter | None = None
        self.rate_rules: list[RateRule] = []
        self.runtime: SandboxRuntime | None = None
        self.state: dict[str, Any] = {}

    def plugin_hooks(self) -> dict[str, list[str]]:
        """Plugin name -> the hooks it implements."""
        out: dict[str, list[str]] = {}
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            callers = self.pm.get_hookcallers(plugin) or []
            out[name] = sorted(c.name for c in callers)
        return out
