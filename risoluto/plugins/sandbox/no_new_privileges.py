"""Checklist item "Capabilities" (part 2): ``noNewPrivileges: true`` -> SecurityOpt no-new-privileges."""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult

ITEM = "sandbox no-new-privileges"
OPT = "no-new-privileges"


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    on = settings.codex.sandbox.security.no_new_privileges
    if on and OPT not in spec.security_opt:
        # setuid/setgid binaries and file capabilities then grant nothing on exec.
        spec.security_opt.append(OPT)
    spec.policy["noNewPrivileges"] = on


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.codex.sandbox.security.no_new_privileges:
        return [CheckResult(item=ITEM, status=PASS, reason="workers run with no-new-privileges")]
    return [CheckResult(
        item=ITEM, status=FAIL, reason="noNewPrivileges is off: setuid binaries in the image can raise privileges",
        fix="set codex.sandbox.security.noNewPrivileges: true",
    )]
