"""The tutorial plugin (docs/plugins.md): a team label, a read-only cache mount and a network of
its own for every sandbox, plus a doctor check.

Configured in the config file under ``plugins.settings.example`` (checked at startup):

    plugins:
      settings:
        example:
          team: blue                       # label value (default "agents")
          cache: /var/cache/risoluto-example  # host directory mounted read-only at /opt/cache
          network: team-blue               # the network sandboxes join (default: the kernel's)

``RISOLUTO_EXAMPLE_TEAM``, ``RISOLUTO_EXAMPLE_CACHE`` and ``RISOLUTO_EXAMPLE_NETWORK`` override
a value (for one run); they are never the only way to set it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from risoluto.errors import ConfigError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.sandbox import ContainerSpec, Mount

NAME = "example"  # the entry point's name: the plugin's name and its settings section
CACHE_TARGET = "/opt/cache"
DEFAULTS = {"team": "agents", "cache": "/var/cache/risoluto-example", "network": ""}
OVERRIDES = {"team": "RISOLUTO_EXAMPLE_TEAM", "cache": "RISOLUTO_EXAMPLE_CACHE", "network": "RISOLUTO_EXAMPLE_NETWORK"}


def options(kernel: Any) -> dict[str, str]:
    """The settings in force: the environment's override, else the config file's, else the default."""
    section = kernel.plugin_settings(NAME)
    return {key: kernel.environ.get(OVERRIDES[key]) or section.get(key, default) for key, default in DEFAULTS.items()}


@hookimpl
def risoluto_settings_validate(settings: Any) -> None:
    section = settings.plugins.settings.get(NAME, {})
    for key, value in section.items():
        where = f"plugins.settings.{NAME}.{key}"
        if key not in DEFAULTS:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(DEFAULTS)})")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
    cache = section.get("cache")
    if cache is not None and not os.path.isabs(cache):
        raise ConfigError(f"plugins.settings.{NAME}.cache: must be an absolute path, got {cache!r}")


@hookimpl
def risoluto_sandbox_spec(kernel: Any, spec: ContainerSpec) -> None:
    opts = options(kernel)
    spec.labels["example.team"] = opts["team"]
    if opts["network"]:
        spec.network = opts["network"]  # stands: third-party edits run after the defaults
    if Path(opts["cache"]).is_dir():
        spec.mounts.append(Mount(source=opts["cache"], target=CACHE_TARGET, type="bind", read_only=True))


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    path = Path(options(kernel)["cache"])
    if not path.exists():
        return [CheckResult(item="example cache", status=WARN, reason=f"{path} does not exist; no cache is mounted",
                            fix=f"mkdir -p {path} or set plugins.settings.example.cache")]
    if path.stat().st_mode & 0o002:
        return [CheckResult(item="example cache", status=FAIL, reason=f"{path} is world-writable",
                            fix=f"chmod o-w {path}")]
    return [CheckResult(item="example cache", status=PASS, reason=f"{path} mounted read-only at {CACHE_TARGET}")]
