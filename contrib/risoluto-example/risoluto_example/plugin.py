"""Adds a team label and a read-only cache mount to every sandbox, plus a doctor check.

Configured through the environment so it needs no config keys of its own:
``RISOLUTO_EXAMPLE_CACHE`` (host directory, default ``/var/cache/risoluto-example``) and
``RISOLUTO_EXAMPLE_TEAM`` (label value, default ``agents``).
"""

from __future__ import annotations

import os
from pathlib import Path

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.sandbox import ContainerSpec, LaunchRequest, Mount

CACHE_TARGET = "/opt/cache"


def cache_dir() -> Path:
    return Path(os.environ.get("RISOLUTO_EXAMPLE_CACHE", "/var/cache/risoluto-example"))


@hookimpl
def risoluto_sandbox_spec(spec: ContainerSpec, request: LaunchRequest, settings: object) -> None:
    spec.labels["example.team"] = os.environ.get("RISOLUTO_EXAMPLE_TEAM", "agents")
    if cache_dir().is_dir():
        spec.mounts.append(Mount(source=str(cache_dir()), target=CACHE_TARGET, type="bind", read_only=True))


@hookimpl
def risoluto_doctor_checks(kernel: object) -> list[CheckResult]:
    path = cache_dir()
    if not path.exists():
        return [CheckResult(item="example cache", status=WARN, reason=f"{path} does not exist; no cache is mounted",
                            fix=f"mkdir -p {path} or set RISOLUTO_EXAMPLE_CACHE")]
    if path.stat().st_mode & 0o002:
        return [CheckResult(item="example cache", status=FAIL, reason=f"{path} is world-writable",
                            fix=f"chmod o-w {path}")]
    return [CheckResult(item="example cache", status=PASS, reason=f"{path} mounted read-only at {CACHE_TARGET}")]
