"""Checklist item "Capabilities" (part 1): ``dropCapabilities: true`` -> CapDrop ALL."""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult

ITEM = "sandbox capabilities"


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    on = settings.codex.sandbox.security.drop_capabilities
    if on:
        # Every capability goes, root in the container included; nothing is added back.
        spec.cap_drop = ["ALL"]
    spec.policy["dropCapabilities"] = on


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.codex.sandbox.security.drop_capabilities:
        return [CheckResult(item=ITEM, status=PASS, reason="workers run with CapDrop ALL")]
    return [CheckResult(
        item=ITEM, status=FAIL, reason="dropCapabilities is off: workers keep Docker's default capabilities",
        fix="set codex.sandbox.security.dropCapabilities: true",
    )]
