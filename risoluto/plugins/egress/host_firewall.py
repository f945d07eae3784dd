"""Checklist item "egress host protection": workers on the egress network reach the proxy port on
the host and nothing else (the rules are in ``_firewall``; docs/egress.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, CheckResult

from ._firewall import CHAIN, can_manage

if TYPE_CHECKING:
    from risoluto.kernel import Kernel


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    item = "egress host protection"
    if not kernel.settings.codex.sandbox.egress_allowlist:
        return [CheckResult(item=item, status=PASS, reason="no allowlist: no egress network to protect the host from")]
    enforcer = kernel.backends.egress
    if enforcer is not None:  # a running kernel: report what is in force
        protection = enforcer.status().get("host_protection", "")
        ok = protection.startswith("firewall")
        return [CheckResult(
            item=item, status=PASS if ok else FAIL, reason=protection or "unknown",
            fix="" if ok else "run the kernel as root so it can add the host firewall rules (see docs/egress.md)",
        )]
    why = can_manage()
    if why:
        return [CheckResult(
            item=item, status=FAIL,
            reason=f"{why}: host services listening on all addresses are exposed to workers through "
                   "the egress network's gateway",
            fix="run the kernel as root with iptables installed, or firewall the egress bridge yourself "
                "(docs/egress.md)",
        )]
    return [CheckResult(item=item, status=PASS,
                        reason=f"the kernel adds {CHAIN} rules so workers reach only the proxy port on the host")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["egress host protection"]
