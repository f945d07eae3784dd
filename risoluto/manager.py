"""Build a plugin manager for one app: specs, default plugins, block list, entry points."""

from __future__ import annotations

import importlib
import importlib.metadata as md
from typing import Any, Iterable

import attrs
import pluggy

from . import hookspecs
from .errors import StartupError

ENTRY_POINT_GROUP = "risoluto"


@attrs.frozen
class PluginInfo:
    """Where a loaded plugin came from, for ``risoluto plugins`` and ``/api/v1/runtime``."""

    name: str
    source: str  # "default" | "entry point" | "given"
    distribution: str
    version: str


# The default plugins, by name (``<group>.<module>`` under ``risoluto.plugins``), in load order.
# A module is a plugin because this list names it, not because of its file name: helpers are
# private modules (``_name.py``), and a name in ``plugins.disable`` is never imported.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "console.audit_api", "console.page", "console.stats",
    "data_plane.server",
    "egress.allowlist", "egress.broker_probes", "egress.credentials", "egress.decisions", "egress.enforcer",
    "egress.host_firewall", "egress.network", "egress.probes",
    "http.client_address", "http.metrics", "http.rate_limit", "http.read_guard", "http.write_guard",
    "sandbox.api", "sandbox.cap_drop", "sandbox.cli", "sandbox.codex_home",
    "sandbox.docker_runtime", "sandbox.gvisor", "sandbox.image_check", "sandbox.network",
    "sandbox.no_new_privileges", "sandbox.policy_guard", "sandbox.remote_runtime", "sandbox.resources",
    "sandbox.seccomp", "sandbox.user", "sandbox.workspace",
    "secrets.api", "secrets.audit_log", "secrets.cli", "secrets.file_store", "secrets.master_key",
    "secrets.service", "secrets.sqlite_store",
    "webhooks.github", "webhooks.inbox", "webhooks.linear",
)


def default_plugin_names() -> list[str]:
    """Default plugins, in load order: ``http.write_guard``, ``secrets.file_store``, ..."""
    return list(DEFAULT_PLUGINS)


def _kernel_version() -> str:
    from . import __version__

    return __version__


def build_plugin_manager(
    disabled: Iterable[str], extra: Iterable[tuple[str, Any]] = ()
) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """Load everything in the documented order, then ``check_pending``.

    ``disabled`` names are skipped before import. ``extra`` are (name, plugin) pairs
    registered after the entry points (tests, embedding code).
    """
    blocked = set(disabled)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    for module in hookspecs.SPEC_MODULES:
        pm.add_hookspecs(importlib.import_module(module))
    infos: list[PluginInfo] = []
    version = _kernel_version()
    for name in default_plugin_names():
        if name in blocked:
            pm.set_blocked(name)
            continue
        _register(pm, importlib.import_module(f"risoluto.plugins.{name}"), name, f"default plugin {name!r}")
        infos.append(PluginInfo(name, "default", "risoluto", version))
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist else "unknown"
        dist_version = ep.dist.version if ep.dist else ""
        what = f"plugin {ep.name!r} (entry point {ep.value!r} of distribution {dist} {dist_version})"
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # any import failure stops startup, naming the plugin
            raise StartupError(f"{what} failed to import: {type(exc).__name__}: {exc}") from exc
        _register(pm, plugin, ep.name, what)
        infos.append(PluginInfo(ep.name, "entry point", dist, dist_version))
    for name, plugin in extra:
        if name in blocked:
            continue
        _register(pm, plugin, name, f"plugin {name!r}")
        infos.append(PluginInfo(name, "given", "", ""))
    unknown = blocked - {i.name for i in infos} - set(default_plugin_names()) - _entry_point_names()
    if unknown:
        raise StartupError(
            f"plugins.disable / RISOLUTO_DISABLE_PLUGINS names unknown plugin(s): {', '.join(sorted(unknown))}; "
            "run `risoluto plugins` to see the names"
        )
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        info = next((i for i in infos if i.name == name), None)
        origin = f" from distribution {info.distribution}" if info and info.distribution else ""
        raise StartupError(f"plugin {name!r}{origin}: {exc}") from exc
    return pm, infos


def _entry_point_names() -> set[str]:
    return {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, what: str) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise StartupError(f"{what}: {exc}") from exc
