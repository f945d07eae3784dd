"""Checklist item "Capabilities" (part 2): ``noNewPrivileges: true`` -> SecurityOpt no-new-privileges."""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult, Probe
from ._probes import HAS_PY, failed, facts, not_proven, passed, probe, seen

ITEM = "sandbox no-new-privileges"
OPT = "no-new-privileges"


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    on = settings.codex.sandbox.security.no_new_privileges
    if on and OPT not in spec.security_opt:
        # setuid/setgid binaries and file capabilities then grant nothing on exec.
        spec.security_opt.append(OPT)
    spec.policy["noNewPrivileges"] = on


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.codex.sandbox.security.no_new_privileges:
        return [CheckResult(item=ITEM, status=PASS, reason="workers run with no-new-privileges")]
    return [CheckResult(
        item=ITEM, status=FAIL, reason="noNewPrivileges is off: setuid binaries in the image can raise privileges",
        fix="set codex.sandbox.security.noNewPrivileges: true",
    )]


# gVisor's /proc/self/status has no NoNewPrivs line: ask prctl(PR_GET_NO_NEW_PRIVS = 39) too.
SCRIPT = (
    "grep '^NoNewPrivs:' /proc/self/status || echo 'NoNewPrivs: absent'; "
    f"if {HAS_PY}; then python3 -c 'import ctypes; print(\"prctl=%d\" % "
    "ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))'; else echo prctl=no-python3; fi"
)
FIX = "set codex.sandbox.security.noNewPrivileges: true"


def judge_nnp(out: str, rc: int) -> CheckResult:
    found = facts(out)
    status, prctl = found.get("NoNewPrivs", ""), found.get("prctl", "")
    if rc != 0 or not status or not prctl:
        return failed(ITEM, f"unexpected probe output (exit {rc}): {seen(out)}", "re-run; check the canary image")
    answers = {k: v for k, v in (("NoNewPrivs", status), ("prctl", prctl)) if v not in ("absent", "no-python3")}
    if not answers:
        return not_proven(ITEM, "/proc/self/status has no NoNewPrivs line and the image has no python3 for prctl",
                          "use a worker image with python3 (contrib/Dockerfile.sandbox)")
    wrong = {k: v for k, v in answers.items() if v != "1"}
    if wrong:
        return failed(ITEM, "the worker may gain privileges: " + ", ".join(f"{k}={v}" for k, v in wrong.items()),
                      FIX)
    how = " and ".join(f"{k}={v}" for k, v in answers.items())
    return passed(ITEM, f"no_new_privs is set inside the canary ({how})")


@hookimpl
def risoluto_doctor_probes(kernel: Any) -> list[Probe]:
    return [probe(ITEM, SCRIPT, judge_nnp)]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["no-new-privileges"]
