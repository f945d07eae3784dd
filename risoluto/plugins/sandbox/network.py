"""Checklist item "Network isolation": workers join ``codex.sandbox.network``.

The default ``risoluto-internal`` (or any configured name) is created by the runtime at the
first launch when missing: a labelled bridge with inter-container traffic disabled, so two
sandboxes cannot reach each other. With a non-empty ``egressAllowlist`` the egress plugin
replaces the network with its internal one afterwards.
"""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult
from ._engine import engine_elsewhere, engine_facts

ITEM = "sandbox network"
SHARED_NAMESPACES = ("host",)


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    sandbox = settings.codex.sandbox
    spec.network = sandbox.network
    spec.policy["network"] = sandbox.network
    spec.policy["egressAllowlist"] = list(sandbox.egress_allowlist)


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    name = kernel.settings.codex.sandbox.network
    if name in SHARED_NAMESPACES or name.startswith("container:"):
        return [CheckResult(item=ITEM, status=FAIL, reason=f"network {name!r} shares a host/container namespace",
                            fix="set codex.sandbox.network: risoluto-internal")]
    if (elsewhere := engine_elsewhere(kernel, ITEM)) is not None:
        return elsewhere
    facts = engine_facts(kernel)
    if not facts["ok"]:
        return [CheckResult(item=ITEM, status=FAIL, reason=f"Docker is {facts['error']}",
                            fix="start Docker")]
    net = facts["networks"].get(name)
    if net is None:
        return [CheckResult(item=ITEM, status=PASS,
                            reason=f"network {name} will be created as a labelled bridge at the first launch")]
    if net.get("Driver") not in ("bridge", "null") and name != "none":
        return [CheckResult(item=ITEM, status=FAIL, reason=f"network {name} uses driver {net.get('Driver')}",
                            fix="use a bridge network")]
    internal = " (internal: no route out)" if net.get("Internal") else ""
    return [CheckResult(item=ITEM, status=PASS, reason=f"workers join {name}{internal}")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["network isolation"]
