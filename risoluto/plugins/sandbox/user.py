"""Checklist row "Container paths": the container user is the kernel's uid:gid (or configured)."""

from __future__ import annotations

from typing import Any

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from ._naming import container_user

ITEM = "sandbox user"


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    uid, gid = container_user(settings)
    spec.user = f"{uid}:{gid}"
    spec.policy["user"] = spec.user


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    try:
        uid, gid = container_user(kernel.settings)
    except ApiError as err:
        return [CheckResult(item=ITEM, status=FAIL, reason=err.message, fix="set codex.sandbox.user: 1000:1000")]
    if uid == 0:
        return [CheckResult(
            item=ITEM, status=WARN,
            reason="workers run as uid 0 (the kernel runs as root): no capabilities, but root owns the image's files",
            fix="set codex.sandbox.user to the image's agent user, e.g. 1000:1000",
        )]
    return [CheckResult(item=ITEM, status=PASS, reason=f"workers run as {uid}:{gid}")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["sandbox user"]
