"""Hardening checks: configuration checks and live probes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@attrs.frozen(kw_only=True)
class CheckResult:
    item: str
    status: str  # PASS | WARN | FAIL
    reason: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@hookspec
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    """Evaluate your checklist items against the live configuration and host.

    Called by ``risoluto doctor`` and ``GET /api/v1/hardening``; collected. Must be
    quick and must not raise (report FAIL with the reason instead).

    Example::

        @hookimpl
        def risoluto_doctor_checks(kernel):
            ok = kernel.settings.codex.sandbox.security.drop_capabilities
            return [CheckResult(item="capabilities", status=PASS if ok else FAIL,
                                reason="...", fix="set dropCapabilities: true")]
    """
