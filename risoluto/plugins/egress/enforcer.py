"""The egress enforcer's doctor item and checklist entry.

With a non-empty ``codex.sandbox.egressAllowlist`` the kernel (``risoluto.backends``), at app
start or when an overlay sets one, asks ``risoluto_egress_enforcer`` for an enforcer (the
default is ``egress.network``), starts it and holds it as ``kernel.backends.egress``; no
enforcer is a startup error naming the setting. The allowlist itself is validated when the
kernel is built (``egress.allowlist``'s ``risoluto_settings_validate``). Every launch then
attaches it after the spec edits (the launcher's attach step marks the spec with the
``risoluto.egress`` label); the fail-closed check on that mark lives in ``egress.allowlist``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult

if TYPE_CHECKING:
    from risoluto.kernel import Kernel


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    if not kernel.settings.codex.sandbox.egress_allowlist:
        return []
    item = "egress proxy"
    enforcer = kernel.backends.egress
    if enforcer is None:
        if kernel.hooks.egress_enforcer(kernel.settings) is None:
            return [CheckResult(item=item, status=FAIL, reason="no egress enforcer is available: every launch "
                                "is refused", fix="enable the egress.network plugin or install an enforcer")]
        return [CheckResult(item=item, status=WARN, reason="the egress proxy runs inside `risoluto serve`; "
                            "this process has not started it", fix="see GET /api/v1/hardening on the server")]
    bind = str(enforcer.status().get("bind", ""))
    host = bind.rsplit(":", 1)[0].strip("[]")
    if host in ("0.0.0.0", "::", "") or host.startswith("127."):
        return [CheckResult(item=item, status=FAIL, reason=f"the egress proxy listens on {bind or 'nothing'}",
                            fix="the proxy must listen on the egress network's gateway only")]
    return [CheckResult(item=item, status=PASS,
                        reason=f"{enforcer.name} listening on {bind}, the egress network's gateway only")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["egress enforcement"]
