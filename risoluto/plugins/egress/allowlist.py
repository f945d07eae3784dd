"""Checklist item "Egress allowlist": the egress mode in the doctor, and the fail-closed check
that refuses a launch under an allowlist no running enforcer attached to (even when the
enforcer plugins are disabled). The entry grammar is in ``_hosts`` and docs/egress.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from risoluto.errors import ApiError, ConfigError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.egress import EGRESS_LABEL

from ._dns import parse_pins, parse_resolver
from ._hosts import Allowlist
from ._rules import EgressRules

if TYPE_CHECKING:
    from risoluto.hookspecs.sandbox import ContainerSpec
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings


@hookimpl
def risoluto_sandbox_spec_check(spec: ContainerSpec, settings: Settings) -> None:
    """Fail closed: under an allowlist, a spec no running enforcer attached to is refused."""
    if not settings.codex.sandbox.egress_allowlist:
        return
    if not spec.labels.get(EGRESS_LABEL):
        raise ApiError(503, "egress_unavailable",
                       "An egress allowlist is configured but no egress enforcer is running "
                       "(see the egress proxy line of GET /api/v1/hardening).")
    added = {c.upper().removeprefix("CAP_") for c in spec.cap_add} & {"ALL", "NET_ADMIN", "NET_RAW"}
    if added:
        raise ApiError(400, "egress_capability",
                       f"A sandbox under the egress allowlist may not get {', '.join(sorted(added))}.")


@hookimpl
def risoluto_settings_validate(settings: Settings) -> None:
    """Refuse an invalid entry at startup and at overlay PUT, not only at the next launch."""
    Allowlist(settings.codex.sandbox.egress_allowlist)
    EgressRules(settings.egress)  # egress.deny and egress.rules, errors naming the key path
    if settings.egress.resolver:
        parse_resolver(settings.egress.resolver)
    parse_pins(settings.egress.hosts)


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    entries = kernel.settings.codex.sandbox.egress_allowlist
    item = "egress allowlist"
    if not entries:
        return [CheckResult(
            item=item, status=WARN,
            reason="egressAllowlist is empty: workers have unrestricted outbound network access",
            fix="list the domains workers need in codex.sandbox.egressAllowlist",
        )]
    try:
        allowlist = Allowlist(entries)
    except ConfigError as exc:
        return [CheckResult(item=item, status=FAIL, reason=str(exc), fix="correct or remove that entry")]
    return [CheckResult(
        item=item, status=PASS,
        reason=f"{len(allowlist.rules)} entr{'y' if len(allowlist.rules) == 1 else 'ies'}; "
               "workers reach only those through the egress proxy",
    )]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["egress allowlist"]
