"""The per-app kernel object handed to plugins: settings, hooks and shared services."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, AsyncIterator, Mapping

import pluggy
from prometheus_client import CollectorRegistry

from .backends import BackendRunner, Backends
from .checklist import check_providers
from .hooks import Hooks
from .errors import ConfigError, StartupError
from .manager import PluginInfo, build_plugin_manager
from .settings import Settings

log = logging.getLogger("risoluto")


class Kernel:
    """One per app. Plugins keep their per-app state here, never in module globals.

    ``settings`` may be replaced at run time by the config overlay API; read it per use.
    ``backends`` (read-only, ``risoluto.backends.Backends``) is what the kernel chose and started
    behind the plugins: the secret store, the rate limiter, the sandbox runtime, the egress
    enforcer; read it per use too (it is replaced whole as backends start and stop).
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
        self.hooks = Hooks(pm, self)
        _check_plugin_sections(settings, infos)
        self.hooks.settings_validate(settings)  # ConfigError names the key path
        check_providers(self)  # a disabled plugin needs a loaded replacement for its checklist items
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self._backends = BackendRunner(self)
        self.state: dict[str, Any] = {}
        self._started: list[Any] = []
        self._running = False

    @property
    def backends(self) -> Backends:
        """The backends as of now (frozen; docs/plugins.md, "Backends"). Plugins read it, per use."""
        return self._backends.current

    def apply_settings(self, settings: Settings) -> None:
        """Replace the live settings (the config overlay API): what the kernel derived from them
        follows at once, so nothing the overlay may hold waits for a restart."""
        self.settings = settings
        self._backends.settings_changed(settings)  # the rate rules

    async def start_new_services(self) -> None:
        """Start the backends and services the current settings call for that are not running yet
        (services by name), so an overlay that, say, sets an egress allowlist over an empty one is
        enforced at once."""
        if not self._running:
            return
        await self._backends.start()
        running = {getattr(s, "name", None) for s in self._started}
        for service in self.hooks.app_services(self):
            if getattr(service, "name", None) in running:
                continue
            await service.start()
            self._started.append(service)

    async def start(self) -> None:
        """Start the backends (``risoluto.backends``), then every plugin service in load order; a
        failure stops what started and raises.

        Idempotent: ``risoluto serve`` starts the kernel before hypercorn (so a startup error is
        one clean line), then Quart's ``before_serving`` calls this again.
        """
        if self._running:
            return
        self._running = True
        try:
            await self._backends.start()  # StartupError naming the backend or the setting
        except Exception:
            await self.stop()
            raise
        for service in self.hooks.app_services(self):
            try:
                await service.start()
            except Exception as exc:
                await self.stop()
                if isinstance(exc, StartupError):
                    raise
                name = getattr(service, "name", type(service).__name__)
                raise StartupError(f"service {name!r} failed to start: {exc}") from exc
            self._started.append(service)

    async def stop(self) -> None:
        """Stop started services in reverse order, then the backends; one failing stop does not
        skip the rest."""
        self._running = False
        while self._started:
            service = self._started.pop()
            try:
                await service.stop()
            except Exception:
                log.exception("service %r failed to stop", getattr(service, "name", service))
        await self._backends.stop()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Kernel]:
        """The kernel with its services started, for CLI commands that need them."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def plugin_settings(self, name: str) -> Mapping[str, Any]:
        """Plugin ``name``'s own section of the config (``plugins.settings.<name>``), snake_case
        keys; empty when the operator gave none. Read it per use: the settings may be replaced."""
        return self.settings.plugins.settings.get(name, {})

    def plugin_hooks(self) -> dict[str, list[str]]:
        """Plugin name -> the hooks it implements."""
        out: dict[str, list[str]] = {}
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            callers = self.pm.get_hookcallers(plugin) or []
            out[name] = sorted(c.name for c in callers)
        return out


def _check_plugin_sections(settings: Settings, infos: list[PluginInfo]) -> None:
    """A section for a plugin that is not loaded (nor disabled) is a typo: fail, naming it."""
    known = {i.name for i in infos} | set(settings.plugins.disable)
    for name in settings.plugins.settings:
        if name not in known:
            raise ConfigError(f"plugins.settings.{name}: no loaded plugin is named {name!r}; "
                              "`risoluto plugins` lists the names")
