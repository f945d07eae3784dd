"""Checklist item "Capabilities" (part 1): ``dropCapabilities: true`` -> CapDrop ALL."""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult, Probe
from ._probes import failed, facts, passed, probe, seen

ITEM = "sandbox capabilities"
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
NONE = "0000000000000000"


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    on = settings.codex.sandbox.security.drop_capabilities
    if on:
        # Every capability goes, root in the container included; nothing is added back.
        spec.cap_drop = ["ALL"]
    spec.policy["dropCapabilities"] = on


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.codex.sandbox.security.drop_capabilities:
        return [CheckResult(item=ITEM, status=PASS, reason="workers run with CapDrop ALL")]
    return [CheckResult(
        item=ITEM, status=FAIL, reason="dropCapabilities is off: workers keep Docker's default capabilities",
        fix="set codex.sandbox.security.dropCapabilities: true",
    )]


def judge_caps(out: str, rc: int) -> CheckResult:
    """Every capability set of the canary's process must be empty (CapAmb may be absent on old kernels)."""
    found = facts(out)
    missing = [k for k in CAP_SETS[:4] if k not in found]
    if rc != 0 or missing:
        return failed(ITEM, f"cannot read the capability sets (missing {', '.join(missing) or '-'}, exit {rc}): "
                      f"{seen(out)}", "check that the canary image has grep and /proc")
    held = {k: found[k] for k in CAP_SETS if k in found and found[k] != NONE}
    if held:
        sets = ", ".join(f"{k}={v}" for k, v in held.items())
        return failed(ITEM, f"the worker holds capabilities: {sets}",
                      "set codex.sandbox.security.dropCapabilities: true and remove any plugin that adds "
                      "capabilities back")
    return passed(ITEM, "CapEff, CapPrm, CapBnd, CapInh (and CapAmb) are all 0 inside the canary")


@hookimpl
def risoluto_doctor_probes(kernel: Any) -> list[Probe]:
    # Always expected empty: with dropCapabilities off this FAILs, which is the point.
    return [probe(ITEM, "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status", judge_caps)]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["cap drop"]
