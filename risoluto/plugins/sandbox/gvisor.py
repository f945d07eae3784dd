"""Checklist item "gVisor": ``gvisor: true`` -> Runtime runsc, verified against the engine.

The runtime refuses a launch whose runtime the engine does not list (503
``sandbox_runtime_missing``): there is never a silent fallback to runc.
"""

from __future__ import annotations

import re
from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult, Probe
from ._engine import engine_elsewhere, engine_facts, runtime_is_gvisor
from ._probes import failed, facts, passed, probe, seen

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
    if (elsewhere := engine_elsewhere(kernel, ITEM)) is not None:
        return elsewhere
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


# gVisor's Sentry prints its own boot messages ("Starting gVisor...") as the kernel log and
# lets an unprivileged reader see them; a runc worker reads the host's log (or is refused).
SCRIPT = "echo kernel=$(uname -sr); dmesg 2>&1 | head -n 3"
BOOT = re.compile(r"^\[\s*0\.0+\] Starting gVisor", re.MULTILINE)


def judge_gvisor(out: str, rc: int) -> CheckResult:
    kernel = facts(out).get("kernel", "?")
    if BOOT.search(out):
        return passed(ITEM, f"the canary runs on gVisor's kernel (uname: {kernel}; dmesg: Starting gVisor)")
    return failed(ITEM, f"gvisor is on but the canary does not run on gVisor (uname: {kernel}; {seen(out)})",
                  "check that runsc is registered in /etc/docker/daemon.json and no plugin changes the runtime")


@hookimpl
def risoluto_doctor_probes(kernel: Any) -> list[Probe]:
    if not kernel.settings.codex.sandbox.security.gvisor:
        return []  # nothing promised (the check above WARNs)
    return [probe(ITEM, SCRIPT, judge_gvisor)]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["gvisor"]
