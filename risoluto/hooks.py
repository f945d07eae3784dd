"""Typed facade over the plugin manager: the only code that touches ``pm.hook``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from .hookspecs.auth import RequestInfo
from .hookspecs.cli import CliCommand
from .hookspecs.doctor import CheckResult, Probe
from .hookspecs.egress import EgressEnforcer, EgressRequest, EgressVerdict
from .hookspecs.ratelimit import RateLimiter, RateRule
from .hookspecs.sandbox import ContainerSpec, LaunchRequest, SandboxEvent, SandboxRuntime
from .hookspecs.secrets import SecretEvent, SecretStore
from .hookspecs.webhooks import WebhookDelivery, WebhookProvider

if TYPE_CHECKING:
    from .errors import ApiError
    from .kernel import Kernel
    from .settings import Settings


def _flat(results: list[Any]) -> list[Any]:
    return [item for result in results if result for item in result]


class Hooks:
    def __init__(self, pm: pluggy.PluginManager):
        self._hook = pm.hook

    # app
    def app_blueprints(self, kernel: Kernel) -> list[Any]:
        return _flat(self._hook.risoluto_app_blueprints(kernel=kernel))

    def app_services(self, kernel: Kernel) -> list[Any]:
        # pluggy calls the last-registered plugin first; start services in load order
        return _flat(reversed(self._hook.risoluto_app_services(kernel=kernel)))

    def settings_validate(self, settings: Settings) -> None:
        self._hook.risoluto_settings_validate(settings=settings)

    # auth
    def client_address(self, info: RequestInfo, settings: Settings) -> tuple[str, bool] | None:
        return self._hook.risoluto_client_address(info=info, settings=settings)

    def request_authorize(self, info: RequestInfo, settings: Settings) -> ApiError | None:
        return self._hook.risoluto_request_authorize(info=info, settings=settings)

    def request_completed(self, info: RequestInfo, status: int, seconds: float) -> None:
        self._hook.risoluto_request_completed(info=info, status=status, seconds=seconds)

    # rate limiting
    def ratelimit_rules(self, settings: Settings) -> list[RateRule]:
        return _flat(reversed(self._hook.risoluto_ratelimit_rules(settings=settings)))

    def ratelimit_backend(self, settings: Settings) -> RateLimiter | None:
        return self._hook.risoluto_ratelimit_backend(settings=settings)

    # secrets
    def secret_store(self, settings: Settings, master_key: str) -> SecretStore | None:
        return self._hook.risoluto_secret_store(settings=settings, master_key=master_key)

    def secret_changing(self, event: SecretEvent, settings: Settings) -> list[Any]:
        """The write-ahead records' finishers (callables taking "the change is durable")."""
        return [f for f in self._hook.risoluto_secret_changing(event=event, settings=settings) if f is not None]

    def secret_changed(self, event: SecretEvent, settings: Settings) -> None:
        self._hook.risoluto_secret_changed(event=event, settings=settings)

    # sandbox
    def sandbox_runtime(self, settings: Settings) -> SandboxRuntime | None:
        return self._hook.risoluto_sandbox_runtime(settings=settings)

    def sandbox_spec(self, spec: ContainerSpec, request: LaunchRequest, settings: Settings) -> None:
        # pluggy order: later-registered first; a policy check that must see the final
        # spec marks itself ``trylast``.
        self._hook.risoluto_sandbox_spec(spec=spec, request=request, settings=settings)

    def sandbox_event(self, event: SandboxEvent) -> None:
        self._hook.risoluto_sandbox_event(event=event)

    # egress
    def egress_enforcer(self, settings: Settings) -> EgressEnforcer | None:
        return self._hook.risoluto_egress_enforcer(settings=settings)

    def egress_decision(self, request: EgressRequest, allowlist: tuple[str, ...]) -> EgressVerdict | None:
        return self._hook.risoluto_egress_decision(request=request, allowlist=allowlist)

    # webhooks
    def webhook_providers(self, settings: Settings) -> list[WebhookProvider]:
        return _flat(reversed(self._hook.risoluto_webhook_providers(settings=settings)))

    def webhook_received(self, delivery: WebhookDelivery) -> None:
        self._hook.risoluto_webhook_received(delivery=delivery)

    # doctor
    def doctor_checks(self, kernel: Kernel) -> list[CheckResult]:
        """Every plugin's checks, in load order. A check that raises is itself a FAIL naming
        its plugin (fail closed), and does not hide the other plugins' checks."""
        from .hookspecs.doctor import FAIL

        results: list[CheckResult] = []
        for impl in self._hook.risoluto_doctor_checks.get_hookimpls():
            try:
                results.extend(impl.function(kernel=kernel) or [])  # type: ignore[arg-type]
            except Exception as exc:
                results.append(CheckResult(item=f"doctor check of {impl.plugin_name}", status=FAIL,
                                           reason=f"the check raised {type(exc).__name__}: {exc}",
                                           fix="report this as a bug in that plugin"))
        return results

    def doctor_probes(self, kernel: Kernel) -> list[Probe]:
        return _flat(reversed(self._hook.risoluto_doctor_probes(kernel=kernel)))

    # cli
    def cli_commands(self) -> list[CliCommand]:
        return _flat(reversed(self._hook.risoluto_cli_commands()))
