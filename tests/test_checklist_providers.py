"""Checklist items cannot vanish (docs/plugins.md, "Checklist items"), and every hook the facade
calls goes through pluggy, so an implementation taking a subset of the arguments works for each."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any

import pluggy
import pytest

from risoluto import hookimpl
from risoluto.checklist import CHECKLIST, ITEM_NAMES
from risoluto.errors import StartupError
from risoluto.hooks import Hooks
from risoluto.hookspecs.sandbox import ContainerSpec, LaunchRequest
from risoluto.hookspecs import PROJECT, SPEC_MODULES
from risoluto.kernel import Kernel
from risoluto.manager import default_plugin_names

pytestmark = pytest.mark.anyio


class WriteGuardReplacement:
    """Declares the write-guard item (as a replacement of http.write_guard would)."""

    def __init__(self) -> None:
        self.declares = True

    @hookimpl
    def risoluto_checklist_provides(self):
        return ["write guard"] if self.declares else []


def test_every_checklist_item_has_a_default_provider_that_declares_it(risoluto_settings):
    kernel = Kernel(risoluto_settings())
    providers = kernel.hooks.checklist_providers(kernel)
    names = set(default_plugin_names())
    for item in CHECKLIST:
        assert set(item.defaults) <= names, item
        assert providers.get(item.name), f"no default plugin declares {item.name!r}"
    assert len(ITEM_NAMES) == len(CHECKLIST)


@pytest.mark.parametrize("plugins, item", [
    (["http.write_guard"], "write guard"), (["http.read_guard"], "read guard"),
    (["http.rate_limit"], "rate limiting"), (["http.client_address"], "client address"),
    (["sandbox.cap_drop"], "cap drop"), (["sandbox.no_new_privileges"], "no-new-privileges"),
    (["sandbox.policy_guard"], "sandbox policy check"), (["egress.allowlist"], "egress allowlist"),
    (["webhooks.inbox"], "webhook verification"), (["secrets.file_store", "secrets.sqlite_store"], "secret store"),
])
def test_disabling_a_provider_without_a_replacement_refuses_to_start(risoluto_settings, plugins, item):
    named = " / ".join(plugins)
    # installed third-party plugins (risoluto-postgres is a secret store too) are not this test's business
    blocked = plugins + sorted(ep.name for ep in entry_points(group="risoluto"))
    with pytest.raises(StartupError, match=f"checklist item '{item}' would have no provider: plugin {named} is disabled"):
        Kernel(risoluto_settings(env={"RISOLUTO_DISABLE_PLUGINS": ",".join(blocked)}))
    with pytest.raises(StartupError, match=f"'{item}'.*{named}"):
        Kernel(risoluto_settings({"plugins": {"disable": blocked}}))


def test_one_of_two_providers_may_go(risoluto_settings):
    kernel = Kernel(risoluto_settings(env={"RISOLUTO_DISABLE_PLUGINS": "secrets.sqlite_store"}))
    from risoluto.checklist import provider_checks

    reason = {r.item: r for r in provider_checks(kernel)}["checklist: secret store"].reason
    assert reason.startswith("provided by secrets.file_store") and "sqlite" not in reason


def test_other_plugins_may_still_be_disabled(risoluto_settings):
    # an enforcer backend, a webhook provider, the metrics: no checklist item of their own
    Kernel(risoluto_settings(env={"RISOLUTO_DISABLE_PLUGINS": "egress.network,webhooks.github,http.metrics"}))


async def test_a_declared_replacement_allows_the_disable_and_the_doctor_names_it(risoluto_client):
    replacement = WriteGuardReplacement()
    client = await risoluto_client(env={"RISOLUTO_DISABLE_PLUGINS": "http.write_guard"},
                                   plugins=(("acme.write_guard", replacement),))
    report = await (await client.get("/api/v1/hardening")).get_json()
    items = {i["item"]: i for i in report["items"]}
    assert items["checklist: write guard"] == {"item": "checklist: write guard", "status": "PASS",
                                               "reason": "provided by acme.write_guard", "fix": ""}
    assert items["checklist: cap drop"]["reason"] == "provided by sandbox.cap_drop"
    # one line per item, no more
    assert {k for k in items if k.startswith("checklist: ")} == {f"checklist: {n}" for n in ITEM_NAMES}
    # a provider that stops declaring its item: the doctor FAILs that item (and names the default)
    replacement.declares = False
    report = await (await client.get("/api/v1/hardening")).get_json()
    line = {i["item"]: i for i in report["items"]}["checklist: write guard"]
    assert line["status"] == "FAIL" and "http.write_guard" in line["fix"]
    assert report["status"] == "FAIL"


def test_two_providers_are_both_named(risoluto_settings):
    kernel = Kernel(risoluto_settings(), (("acme.write_guard", WriteGuardReplacement()),))
    from risoluto.checklist import provider_checks

    line = {r.item: r for r in provider_checks(kernel)}["checklist: write guard"]
    assert line.reason == "provided by http.write_guard, acme.write_guard"


def test_a_declaration_that_raises_stops_startup_naming_the_plugin(risoluto_settings):
    class Broken:
        @hookimpl
        def risoluto_checklist_provides(self, kernel):
            raise RuntimeError("boom")

    with pytest.raises(StartupError, match="plugin 'acme.broken': risoluto_checklist_provides raised RuntimeError"):
        Kernel(risoluto_settings(), (("acme.broken", Broken()),))


# --- every facade call goes through pluggy --------------------------------------------------
class SubsetEverything:
    """One implementation of every hook, each taking NO argument (pluggy allows any subset)."""

    def __init__(self) -> None:
        self.called: set[str] = set()


def _subset_plugin() -> SubsetEverything:
    plugin = SubsetEverything()
    for module in SPEC_MODULES:
        for name, _ in inspect.getmembers(importlib.import_module(module), inspect.isfunction):
            if not name.startswith("risoluto_"):
                continue

            def impl(_name: str = name) -> Any:
                plugin.called.add(_name)
                if _name == "risoluto_doctor_checks":
                    from risoluto.hookspecs.doctor import PASS, CheckResult

                    return [CheckResult(item="subset", status=PASS, reason="called without arguments")]
                return None

            impl.__name__ = name
            # a plain function attribute with no parameters: what `def risoluto_x():` in a module is
            setattr(plugin, name, hookimpl(_no_args(impl)))
    return plugin


def _no_args(func: Any) -> Any:
    def call() -> Any:
        return func()

    call.__name__ = func.__name__
    return call


def _facade_calls(hooks: Hooks, kernel: Any) -> dict[str, Any]:
    """Each public facade method, called once with placeholder arguments."""
    s = kernel.settings
    return {
        "app_blueprints": lambda: hooks.app_blueprints(kernel),
        "app_services": lambda: hooks.app_services(kernel),
        "settings_validate": lambda: hooks.settings_validate(s),
        "client_address": lambda: hooks.client_address(object(), s),  # type: ignore[arg-type]
        "request_authorize": lambda: hooks.request_authorize(object(), s),  # type: ignore[arg-type]
        "request_completed": lambda: hooks.request_completed(object(), 200, 0.1),  # type: ignore[arg-type]
        "ratelimit_rules": lambda: hooks.ratelimit_rules(s),
        "ratelimit_backend": lambda: hooks.ratelimit_backend(s),
        "secret_store": lambda: hooks.secret_store(s, "key"),
        "secret_changed": lambda: hooks.secret_changed(object(), s),  # type: ignore[arg-type]
        "secret_changing": lambda: hooks.secret_changing(object(), s),  # type: ignore[arg-type]
        "sandbox_runtime": lambda: hooks.sandbox_runtime(s),
        "sandbox_launcher": lambda: hooks.sandbox_launcher(),
        "sandbox_spec": lambda: hooks.sandbox_spec(object(), object(), s),  # type: ignore[arg-type]
        "sandbox_spec_check": lambda: hooks.sandbox_spec_check(ContainerSpec(name="x", image="i"),
                                                               LaunchRequest(issue="i"), s),
        "sandbox_event": lambda: hooks.sandbox_event(object()),  # type: ignore[arg-type]
        "egress_enforcer": lambda: hooks.egress_enforcer(s),
        "egress_decision": lambda: hooks.egress_decision(object(), ()),  # type: ignore[arg-type]
        "egress_decide": lambda: hooks.egress_decide(object()),  # type: ignore[arg-type]
        "webhook_providers": lambda: hooks.webhook_providers(s),
        "webhook_received": lambda: hooks.webhook_received(object()),  # type: ignore[arg-type]
        "doctor_checks": lambda: hooks.doctor_checks(kernel),
        "doctor_probes": lambda: hooks.doctor_probes(kernel),
        "checklist_providers": lambda: hooks.checklist_providers(kernel),
        "cli_commands": lambda: hooks.cli_commands(),
    }


def test_subset_implementations_of_every_hook_are_called(risoluto_settings):
    pm = pluggy.PluginManager(PROJECT)
    for module in SPEC_MODULES:
        pm.add_hookspecs(importlib.import_module(module))
    plugin = _subset_plugin()
    pm.register(plugin, name="acme.subset")
    pm.check_pending()
    kernel = Kernel(risoluto_settings())  # only for its settings: the hooks under test are pm's
    hooks = Hooks(pm, kernel)
    calls = _facade_calls(hooks, kernel)
    public = {n for n, _ in inspect.getmembers(Hooks, inspect.isfunction) if not n.startswith("_")}
    assert set(calls) == public, "a facade method without a call here"
    results = {name: call() for name, call in calls.items()}
    every_hook = {n for n in dir(pm.hook) if n.startswith("risoluto_")}
    assert plugin.called == every_hook
    assert [r.item for r in results["doctor_checks"]] == ["subset"]  # not "the check raised TypeError"


def test_a_third_party_doctor_check_without_arguments_reports_in_the_doctor(risoluto_settings):
    class NoArgs:
        @hookimpl
        def risoluto_doctor_checks(self):
            from risoluto.hookspecs.doctor import PASS, CheckResult

            return [CheckResult(item="acme item", status=PASS, reason="fine")]

    class Raises:
        @hookimpl
        def risoluto_doctor_checks(self, kernel):
            raise ValueError("broken check")

    kernel = Kernel(risoluto_settings(), (("acme.noargs", NoArgs()), ("acme.raises", Raises())))
    from risoluto.doctor import run_checks

    results = {r.item: r for r in run_checks(kernel)}
    assert results["acme item"].status == "PASS"
    broken = results["doctor check of acme.raises"]
    assert broken.status == "FAIL" and "ValueError: broken check" in broken.reason
    assert "Write guard" in results and "checklist: write guard" in results  # the others are not hidden
    assert not [r for r in results.values() if "TypeError" in r.reason]
