"""App lifecycle and routes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel


class Service(Protocol):
    """Something with async start/stop, run for the lifetime of the app."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@hookspec
def risoluto_app_blueprints(kernel: Kernel) -> list[Any]:
    """Return Quart blueprints to register on the app.

    Called once by ``create_app`` after every plugin is loaded. Collected from every
    plugin (not firstresult). Return a list of ``quart.Blueprint`` (may be empty).

    Example::

        @hookimpl
        def risoluto_app_blueprints(kernel):
            bp = Blueprint("hello", __name__)
            bp.add_url_rule("/api/v1/hello", view_func=lambda: {"hi": 1})
            return [bp]
    """


@hookspec
def risoluto_app_services(kernel: Kernel) -> list[Service]:
    """Return services to start when the app starts and stop when it stops.

    Called once by ``create_app``; collected. Each ``start()`` is awaited in plugin
    order before the first request is served; a failing start stops startup. Each
    ``stop()`` is awaited in reverse order on shutdown, even if another stop failed.

    Example::

        @hookimpl
        def risoluto_app_services(kernel):
            return [MyJanitor(kernel)]
    """


@hookspec
def risoluto_settings_validate(kernel: Kernel, settings: Any) -> None:
    """Check the parts of the settings only your plugin understands; raise ``ConfigError``.

    Called when the kernel is built (startup, every CLI command) and before
    ``PUT /api/v1/config/overlay`` saves an overlay, so an invalid value is refused with the
    key path before it can take effect. Collected; return values are ignored. The message
    must name the key path, e.g. ``codex.sandbox.egressAllowlist: invalid entry 'a..b'``.

    A plugin's own settings live in ``settings.plugins.settings[<plugin name>]`` (a mapping with
    snake_case keys; ``kernel.plugin_settings(name)`` at run time): validate them here (unknown
    key, wrong type, bad value), naming ``plugins.settings.<name>.<key>``.

    Example::

        @hookimpl
        def risoluto_settings_validate(settings):
            mine = settings.plugins.settings.get("acme", {})
            for key in set(mine) - {"team"}:
                raise ConfigError(f"plugins.settings.acme.{key}: unknown key")
    """
