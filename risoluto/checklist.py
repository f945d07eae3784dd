"""The checklist items every running kernel must have a provider for.

An item is provided by a loaded plugin whose ``risoluto_checklist_provides(kernel)`` returns its
name. The default plugins provide every item; a plugin may be disabled (``plugins.disable``,
``RISOLUTO_DISABLE_PLUGINS``) only when another loaded plugin declares the items it provided,
otherwise the kernel refuses to start, naming the plugin and the item. The doctor shows one line
per item naming its provider(s), and FAILs an item without one. docs/plugins.md ("Checklist items")
is the extension author's description.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from .errors import StartupError
from .hookspecs.doctor import FAIL, PASS, CheckResult

if TYPE_CHECKING:
    from .kernel import Kernel

CONTROL, DATA_PLANE = "control", "data-plane"


@attrs.frozen
class ChecklistItem:
    name: str
    defaults: tuple[str, ...]  # the default plugin(s) that provide it, named when none is loaded
    roles: frozenset[str] = frozenset({CONTROL})  # sandbox.role values the item applies to


_BOTH = frozenset({CONTROL, DATA_PLANE})
CHECKLIST: tuple[ChecklistItem, ...] = (
    ChecklistItem("client address", ("http.client_address",), _BOTH),
    ChecklistItem("write guard", ("http.write_guard",), _BOTH),
    ChecklistItem("read guard", ("http.read_guard",), _BOTH),
    ChecklistItem("rate limiting", ("http.rate_limit",), _BOTH),
    ChecklistItem("webhook verification", ("webhooks.inbox",)),
    ChecklistItem("master key", ("secrets.master_key",)),
    ChecklistItem("secret store", ("secrets.file_store", "secrets.sqlite_store")),
    ChecklistItem("secrets audit log", ("secrets.audit_log",)),
    ChecklistItem("cap drop", ("sandbox.cap_drop",)),
    ChecklistItem("no-new-privileges", ("sandbox.no_new_privileges",)),
    ChecklistItem("gvisor", ("sandbox.gvisor",)),
    ChecklistItem("seccomp", ("sandbox.seccomp",)),
    ChecklistItem("network isolation", ("sandbox.network",)),
    ChecklistItem("resource limits", ("sandbox.resources",)),
    ChecklistItem("sandbox user", ("sandbox.user",)),
    ChecklistItem("workspace", ("sandbox.workspace",)),
    ChecklistItem("sandbox policy check", ("sandbox.policy_guard",), _BOTH),
    ChecklistItem("egress allowlist", ("egress.allowlist",)),
    ChecklistItem("egress enforcement", ("egress.enforcer",)),
    ChecklistItem("egress host protection", ("egress.host_firewall",)),
)
ITEM_NAMES = frozenset(item.name for item in CHECKLIST)


def items_for(kernel: Kernel) -> tuple[ChecklistItem, ...]:
    role = kernel.settings.sandbox.role
    return tuple(item for item in CHECKLIST if role in item.roles)


def check_providers(kernel: Kernel) -> None:
    """StartupError naming the first item without a provider and the plugin that provided it."""
    providers = kernel.hooks.checklist_providers(kernel)
    disabled = set(kernel.settings.plugins.disable)
    for item in items_for(kernel):
        if providers.get(item.name):
            continue
        gone = [name for name in item.defaults if name in disabled]
        why = (f"plugin {' / '.join(gone)} is disabled (plugins.disable or RISOLUTO_DISABLE_PLUGINS) and no "
               "other loaded plugin declares it" if gone else
               f"no loaded plugin declares it (by default {' / '.join(item.defaults)})")
        raise StartupError(
            f"checklist item {item.name!r} would have no provider: {why}. Re-enable that plugin, or load a "
            f"replacement whose risoluto_checklist_provides returns {item.name!r} (docs/plugins.md, "
            "\"Checklist items\")."
        )


def provider_checks(kernel: Kernel) -> list[CheckResult]:
    """One doctor line per checklist item, naming its provider(s); FAIL when it has none."""
    try:
        providers = kernel.hooks.checklist_providers(kernel)
    except StartupError as exc:
        return [CheckResult(item="checklist", status=FAIL, reason=str(exc), fix="report this as a bug in that plugin")]
    out = []
    for item in items_for(kernel):
        names = providers.get(item.name, [])
        if names:
            out.append(CheckResult(item=f"checklist: {item.name}", status=PASS,
                                   reason=f"provided by {', '.join(names)}"))
        else:
            out.append(CheckResult(item=f"checklist: {item.name}", status=FAIL,
                                   reason="no loaded plugin provides this item",
                                   fix=f"enable {' or '.join(item.defaults)}, or load a plugin that declares "
                                       f"{item.name!r} in risoluto_checklist_provides"))
    return out
