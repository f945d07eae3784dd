"""Checklist item "gVisor": ``gvisor: true`` -> Runtime runsc, verified against the engine.

The runtime refuses a launch whose runtime the engine does not list (503
``sandbox_runtime_missing``): there is never a silent fallback to runc.
"""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from ._engine import engine_facts, runtime_is_gvisor

ITEM = "sandbox gVisor"
RUNSC = "runsc"


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    on = settings.codex.sandbox.security.gvisor
    if on:
        spec.runtime = RUNSC
    spec.policy["gvisor"] = on
    spec.policy["runtime"] = RUNSC if on else "runc"


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if not kernel.settings.codex.sandbox.security.gvisor:
        return [CheckResult(
            item=ITEM, status=WARN, reason="gvisor is off: workers share the host kernel (runc)",
            fix="install runsc, register it in /etc/docker/daemon.json and set codex.sandbox.security.gvisor: true",
        )]
    facts = engine_facts(kernel)
    if not facts["ok"]:
        return [CheckResult(item=ITEM, status=FAIL, reason=f"gvisor is on but Docker is {facts['error']}",
                            fix="start Docker, then check that `docker info` lists runsc")]
    entry = facts["runtimes"].get(RUNSC)
    if entry is None or not runtime_is_gvisor(entry):
        return [CheckResult(
            item=ITEM, status=FAIL, reason="gvisor is on but the engine has no runsc runtime: launches are refused",
            fix='install runsc and add "runtimes": {"runsc": {"path": "/usr/bin/runsc"}} to /etc/docker/daemon.json',
        )]
    return [CheckResult(item=ITEM, status=PASS, reason=f"workers run under runsc ({entry.get('path')})")]
