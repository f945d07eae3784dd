"""The egress service: starts the chosen enforcer with the app.

With a non-empty ``codex.sandbox.egressAllowlist`` the ``egress`` service, at app start,
validates the allowlist, asks ``risoluto_egress_enforcer`` for an enforcer (the default is
``egress.network``), starts it and makes it the kernel's ``egress_enforcer``. Every launch then
attaches it after the spec edits (the launcher's attach step marks the spec with the
``risoluto.egress`` label); the fail-closed check on that mark lives in ``egress.allowlist``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from risoluto.errors import ConfigError, StartupError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult

from ._hosts import Allowlist

if TYPE_CHECKING:
    from risoluto.hookspecs.egress import EgressEnforcer
    from risoluto.kernel import Kernel


class EgressService:
    name = "egress"

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.enforcer: EgressEnforcer | None = None

    async def start(self) -> None:
        settings = self.kernel.settings
        try:
            Allowlist(settings.codex.sandbox.egress_allowlist)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        enforcer = self.kernel.hooks.egress_enforcer(settings)
        if enforcer is None:
            if settings.sandbox.runtime != "docker":
                raise StartupError(
                    f"codex.sandbox.egressAllowlist needs sandbox.runtime: docker (the egress proxy runs beside "
                    f"the engine); with sandbox.runtime: {settings.sandbox.runtime} use an empty allowlist "
                    "(docs/data-plane.md)")
            raise StartupError("codex.sandbox.egressAllowlist is set but no egress enforcer is available "
                               "(is the egress.network plugin disabled?)")
        await enforcer.start(self.kernel)
        self.enforcer = enforcer
        self.kernel.egress_enforcer = enforcer

    async def stop(self) -> None:
        if self.enforcer is None:
            return
        self.kernel.egress_enforcer = None
        await self.enforcer.stop()
        self.enforcer = None


@hookimpl
def risoluto_app_services(kernel: Kernel) -> list[Any]:
    return [EgressService(kernel)] if kernel.settings.codex.sandbox.egress_allowlist else []


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    if not kernel.settings.codex.sandbox.egress_allowlist:
        return []
    item = "egress proxy"
    enforcer = kernel.egress_enforcer
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
