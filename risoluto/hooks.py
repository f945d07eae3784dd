"""Typed facade over the plugin manager: the only code that touches ``pm.hook``."""

from __future__ import annotations

import copy as copy_module
import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pluggy

from .hookspecs.auth import RequestInfo
from .hookspecs.cli import CliCommand
from .hookspecs.doctor import CheckResult, Probe
from .hookspecs.egress import EgressApproval, EgressEnforcer, EgressRequest, EgressVerdict
from .hookspecs.ratelimit import RateLimiter, RateRule
from .hookspecs.sandbox import ContainerSpec, LaunchRequest, Launcher, SandboxEvent, SandboxRuntime
from .hookspecs.secrets import SecretEvent, SecretStore
from .hookspecs.webhooks import WebhookDelivery, WebhookProvider

if TYPE_CHECKING:
    from .errors import ApiError
    from .kernel import Kernel
    from .settings import Settings


def spec_snapshot(spec: ContainerSpec) -> ContainerSpec:
    """A deep copy of ``spec`` for the check phase; the lifecycle callbacks are shared, not copied
    (a deep copy of a bound method would copy the runtime it belongs to)."""
    callbacks = spec.on_created, spec.on_removed
    spec.on_created, spec.on_removed = [], []
    try:
        copy = copy_module.deepcopy(spec)
    finally:
        spec.on_created, spec.on_removed = callbacks
    copy.on_created, copy.on_removed = list(callbacks[0]), list(callbacks[1])
    return copy


def _flat(results: list[Any]) -> list[Any]:
    return [item for result in results if result for item in result]


class Hooks:
    """Every hook gets the kernel it runs in (an implementation may take any subset of a
    hook's arguments, pluggy's rule), so no plugin needs ``quart.current_app`` or globals."""

    def __init__(self, pm: pluggy.PluginManager, kernel: Kernel):
        self._pm = pm
        self._hook = pm.hook
        self._kernel = kernel
        self._spec_groups: tuple[Any, Any] | None = None

    # app
    def app_blueprints(self, kernel: Kernel) -> list[Any]:
        return _flat(self._hook.risoluto_app_blueprints(kernel=kernel))

    def app_services(self, kernel: Kernel) -> list[Any]:
        # pluggy calls the last-registered plugin first; start services in load order
        return _flat(reversed(self._hook.risoluto_app_services(kernel=kernel)))

    def settings_validate(self, settings: Settings) -> None:
        self._hook.risoluto_settings_validate(kernel=self._kernel, settings=settings)

    # auth
    def client_address(self, info: RequestInfo, settings: Settings) -> tuple[str, bool] | None:
        return self._hook.risoluto_client_address(kernel=self._kernel, info=info, settings=settings)

    def request_authorize(self, info: RequestInfo, settings: Settings) -> ApiError | None:
        return self._hook.risoluto_request_authorize(kernel=self._kernel, info=info, settings=settings)

    def request_completed(self, info: RequestInfo, status: int, seconds: float) -> None:
        self._hook.risoluto_request_completed(kernel=self._kernel, info=info, status=status, seconds=seconds)

    # rate limiting
    def ratelimit_rules(self, settings: Settings) -> list[RateRule]:
        return _flat(reversed(self._hook.risoluto_ratelimit_rules(kernel=self._kernel, settings=settings)))

    def ratelimit_backend(self, settings: Settings) -> RateLimiter | None:
        return self._hook.risoluto_ratelimit_backend(kernel=self._kernel, settings=settings)

    # secrets
    def secret_store(self, settings: Settings, master_key: str) -> SecretStore | None:
        return self._hook.risoluto_secret_store(kernel=self._kernel, settings=settings, master_key=master_key)

    def secret_changing(self, event: SecretEvent, settings: Settings) -> list[Any]:
        """The write-ahead records' finishers (callables taking "the change is durable")."""
        return [f for f in self._hook.risoluto_secret_changing(kernel=self._kernel, event=event, settings=settings)
                if f is not None]

    def secret_changed(self, event: SecretEvent, settings: Settings) -> None:
        self._hook.risoluto_secret_changed(kernel=self._kernel, event=event, settings=settings)

    # sandbox
    def sandbox_runtime(self, settings: Settings) -> SandboxRuntime | None:
        return self._hook.risoluto_sandbox_runtime(kernel=self._kernel, settings=settings)

    def sandbox_launcher(self) -> Launcher | None:
        return self._hook.risoluto_sandbox_launcher(kernel=self._kernel)

    def sandbox_spec(self, spec: ContainerSpec, request: LaunchRequest, settings: Settings) -> None:
        """The edit phase: the default plugins' edits, then everyone else's, so a third party's
        choice stands (pluggy alone would call the later-registered third parties first)."""
        for group in self._sandbox_spec_groups():
            group(kernel=self._kernel, spec=spec, request=request, settings=settings)

    def sandbox_spec_check(self, spec: ContainerSpec, request: LaunchRequest, settings: Settings) -> None:
        """The check phase, on a copy: a check that changes what it judges refuses the launch."""
        copy = spec_snapshot(spec)
        self._hook.risoluto_sandbox_spec_check(kernel=self._kernel, spec=copy, request=request, settings=settings)
        if copy != spec:
            from .errors import ApiError

            raise ApiError(403, "sandbox_policy_violation",
                           "a risoluto_sandbox_spec_check implementation changed the spec it was checking; "
                           "checks must only read it (edits belong in risoluto_sandbox_spec)")

    def _sandbox_spec_groups(self) -> tuple[Any, Any]:
        if self._spec_groups is None:  # the plugin set is fixed once the kernel is built
            defaults = {i.name for i in self._kernel.plugins if i.source == "default"}
            named = [(name, plugin) for name, plugin in self._pm.list_name_plugin() if plugin is not None]
            default_plugins = [p for name, p in named if name in defaults]
            others = [p for name, p in named if name not in defaults]
            caller = self._pm.subset_hook_caller
            self._spec_groups = (caller("risoluto_sandbox_spec", remove_plugins=others),
                                 caller("risoluto_sandbox_spec", remove_plugins=default_plugins))
        return self._spec_groups

    def sandbox_event(self, event: SandboxEvent) -> None:
        self._hook.risoluto_sandbox_event(kernel=self._kernel, event=event)

    # egress
    def egress_enforcer(self, settings: Settings) -> EgressEnforcer | None:
        return self._hook.risoluto_egress_enforcer(kernel=self._kernel, settings=settings)

    def egress_decision(self, request: EgressRequest, allowlist: tuple[str, ...]) -> EgressVerdict | None:
        hook = self._hook.risoluto_egress_decision
        if not hook.get_hookimpls():  # asked on every proxied connection: skip pluggy's call when nobody listens
            return None
        return hook(kernel=self._kernel, request=request, allowlist=allowlist)

    def egress_decide(self, approval: EgressApproval) -> str | None:
        return self._hook.risoluto_egress_decide(kernel=self._kernel, approval=approval)

    # webhooks
    def webhook_providers(self, settings: Settings) -> list[WebhookProvider]:
        return _flat(reversed(self._hook.risoluto_webhook_providers(kernel=self._kernel, settings=settings)))

    def webhook_received(self, delivery: WebhookDelivery) -> None:
        self._hook.risoluto_webhook_received(kernel=self._kernel, delivery=delivery)

    # doctor
    def doctor_checks(self, kernel: Kernel) -> list[CheckResult]:
        """Every plugin's checks, in load order. A check that raises is itself a FAIL naming
        its plugin (fail closed), and does not hide the other plugins' checks."""
        from .hookspecs.doctor import FAIL

        results: list[CheckResult] = []
        for name, call in self._each("risoluto_doctor_checks", kernel=kernel):
            try:
                results.extend(call())
            except Exception as exc:
                results.append(CheckResult(item=f"doctor check of {name}", status=FAIL,
                                           reason=f"the check raised {type(exc).__name__}: {exc}",
                                           fix="report this as a bug in that plugin"))
        return results

    def checklist_providers(self, kernel: Kernel) -> dict[str, list[str]]:
        """Checklist item -> the plugins that declare they provide it, in load order.
        A plugin whose declaration raises is a StartupError naming it (fail closed)."""
        from .errors import StartupError

        out: dict[str, list[str]] = {}
        for name, call in self._each("risoluto_checklist_provides", kernel=kernel):
            try:
                items = call()
            except Exception as exc:
                raise StartupError(f"plugin {name!r}: risoluto_checklist_provides raised "
                                   f"{type(exc).__name__}: {exc}") from exc
            for item in items:
                if isinstance(item, str) and name not in out.setdefault(item, []):
                    out[item].append(name)
        return out

    def _each(self, hook: str, **kwargs: Any) -> Iterator[tuple[str, Callable[[], list[Any]]]]:
        """(plugin name, call) per implementation, in load order: each call goes through pluggy
        with only that plugin's implementation (pluggy maps the arguments, so an implementation
        may take any subset of them, and wrappers still wrap it), so one failing plugin can be
        reported without hiding the others."""
        impls = [i for i in getattr(self._hook, hook).get_hookimpls() if not (i.hookwrapper or i.wrapper)]
        for impl in impls:
            one = self._pm.subset_hook_caller(hook, remove_plugins=[i.plugin for i in impls if i is not impl])
            yield impl.plugin_name, functools.partial(lambda caller: _flat(caller(**kwargs)), one)

    def doctor_probes(self, kernel: Kernel) -> list[Probe]:
        return _flat(reversed(self._hook.risoluto_doctor_probes(kernel=kernel)))

    # cli
    def cli_commands(self) -> list[CliCommand]:
        return _flat(reversed(self._hook.risoluto_cli_commands(kernel=self._kernel)))
