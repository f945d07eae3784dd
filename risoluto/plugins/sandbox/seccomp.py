"""Checklist item "Seccomp": ``seccompProfile: <path>`` -> that profile, validated, as JSON.

The Engine API takes the profile itself (``SecurityOpt: ["seccomp=<json>"]``), not a path:
the file is read and validated at every launch, so an edited profile applies to the next
launch and a broken one refuses it (503) instead of silently falling back to the default.
An empty ``seccompProfile`` keeps Docker's default profile.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult
from ._engine import engine_facts, seccomp_filters_enforced

ITEM = "sandbox seccomp"
MAX_PROFILE_BYTES = 1024 * 1024
ACTIONS = frozenset({
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY",
})
_TOP_KEYS = frozenset({
    "defaultAction", "defaultErrnoRet", "architectures", "archMap", "syscalls", "flags",
    "listenerPath", "listenerMetadata",
})


class ProfileError(Exception):
    pass


def load_profile(path_text: str) -> tuple[str, str]:
    """(compact JSON, sha256) of a valid profile; ProfileError with the reason otherwise."""
    path = Path(path_text).expanduser()
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"cannot read seccomp profile {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(f"seccomp profile {path} is larger than 1 MiB")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"seccomp profile {path} is not valid JSON ({exc})") from None
    validate(data, str(path))
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return text, hashlib.sha256(text.encode()).hexdigest()


def validate(data: Any, where: str) -> None:
    """The shape Docker's seccomp loader expects, so mistakes are caught here with a reason."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: the profile must be a JSON object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if data.get("defaultAction") not in ACTIONS:
        raise ProfileError(f"{where}: defaultAction must be one of SCMP_ACT_* (got {data.get('defaultAction')!r})")
    if "defaultErrnoRet" in data and not _is_int(data["defaultErrnoRet"]):
        raise ProfileError(f"{where}: defaultErrnoRet must be an integer")
    for key in ("architectures", "flags"):
        if key in data and not _str_list(data[key]):
            raise ProfileError(f"{where}: {key} must be a list of strings")
    syscalls = data.get("syscalls", [])
    if not isinstance(syscalls, list):
        raise ProfileError(f"{where}: syscalls must be a list")
    for i, rule in enumerate(syscalls):
        _validate_rule(rule, f"{where}: syscalls[{i}]")


def _validate_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, dict):
        raise ProfileError(f"{where} must be an object")
    names = rule.get("names", [rule["name"]] if isinstance(rule.get("name"), str) else None)
    if not _str_list(names) or not names or not all(names):
        raise ProfileError(f"{where} needs names (a non-empty list of syscall names)")
    if rule.get("action") not in ACTIONS:
        raise ProfileError(f"{where}: action must be one of SCMP_ACT_* (got {rule.get('action')!r})")
    if "errnoRet" in rule and not _is_int(rule["errnoRet"]):
        raise ProfileError(f"{where}: errnoRet must be an integer")
    args = rule.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, dict) and _is_int(a.get("index")) for a in args):
        raise ProfileError(f"{where}: args must be a list of objects with an integer index")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    path = settings.codex.sandbox.security.seccomp_profile
    spec.policy["seccompProfile"] = path
    if not path:
        return  # Docker's default profile
    try:
        text, digest = load_profile(path)
    except ProfileError as exc:
        raise ApiError(503, "seccomp_profile_invalid",
                       f"{exc}; fix codex.sandbox.security.seccompProfile (launch refused).") from None
    spec.security_opt.append(f"seccomp={text}")
    spec.policy["seccompProfileSha256"] = digest


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    security = kernel.settings.codex.sandbox.security
    if not security.seccomp_profile:
        return [CheckResult(item=ITEM, status=PASS, reason="Docker's default seccomp profile applies")]
    try:
        load_profile(security.seccomp_profile)
    except ProfileError as exc:
        return [CheckResult(item=ITEM, status=FAIL, reason=str(exc),
                            fix="point codex.sandbox.security.seccompProfile at a valid profile")]
    if security.gvisor:
        entry = engine_facts(kernel)["runtimes"].get("runsc")
        if entry is not None and not seccomp_filters_enforced(entry):
            return [CheckResult(
                item=ITEM, status=FAIL,
                reason="runsc is registered without --oci-seccomp: it would ignore the profile; launches are refused",
                fix='add "--oci-seccomp" to runsc\'s runtimeArgs in /etc/docker/daemon.json',
            )]
    return [CheckResult(item=ITEM, status=PASS, reason=f"profile {security.seccomp_profile} is valid")]
