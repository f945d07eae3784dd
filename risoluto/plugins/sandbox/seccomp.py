"""Checklist item "Seccomp": ``seccompProfile: <path>`` -> that profile, validated, as JSON.

The Engine API takes the profile itself (``SecurityOpt: ["seccomp=<json>"]``), not a path:
the file is read and validated at every launch, so an edited profile applies to the next
launch and a broken one refuses it (503) instead of silently falling back to the default.
An empty ``seccompProfile`` keeps Docker's default profile.
"""

from __future__ import annotations

import errno
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult, Probe
from ._engine import engine_facts, seccomp_filters_enforced
from ._probes import HAS_PY, failed, facts, not_proven, passed, probe, seen

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
        entry = engine_facts(kernel).get("runtimes", {}).get("runsc")
        if entry is not None and not seccomp_filters_enforced(entry):
            return [CheckResult(
                item=ITEM, status=FAIL,
                reason="runsc is registered without --oci-seccomp: it would ignore the profile; launches are refused",
                fix='add "--oci-seccomp" to runsc\'s runtimeArgs in /etc/docker/daemon.json',
            )]
    return [CheckResult(item=ITEM, status=PASS, reason=f"profile {security.seccomp_profile} is valid")]


# --- doctor --probe ------------------------------------------------------------------------
# Syscalls the probe may call with all-zero arguments, harmless whatever happens:
# name -> (x86_64 number, aarch64 number or None, errno without any filter for an unprivileged,
# capability-less caller; 0 = succeeds). A denial is proven only by the profile's errno where
# that differs from the natural result.
SYSCALLS: dict[str, tuple[int, int | None, int]] = {
    "keyctl": (250, 219, errno.EINVAL), "add_key": (248, 217, errno.EFAULT),
    "request_key": (249, 218, errno.EFAULT), "unshare": (272, 97, 0), "setns": (308, 268, errno.EINVAL),
    "perf_event_open": (298, 241, errno.EFAULT), "mkdir": (83, None, errno.EFAULT),
    "mkdirat": (258, 34, errno.EFAULT), "rmdir": (84, None, errno.EFAULT), "chdir": (80, 49, errno.EFAULT),
    "mknod": (133, None, errno.EFAULT), "mknodat": (259, 33, errno.EFAULT), "symlink": (88, None, errno.EFAULT),
    "symlinkat": (266, 36, errno.EFAULT), "socket": (41, 198, errno.EAFNOSUPPORT), "uname": (63, 160, errno.EFAULT),
}
_ARCH = {"x86_64": 0, "amd64": 0, "aarch64": 1, "arm64": 1}
# Docker's default profile has denied the keyring calls (EPERM) since 1.10.
DEFAULT_DENIED = ("keyctl", errno.EPERM)


def _name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def denied_call(profile: dict[str, Any]) -> tuple[str, int] | None:
    """A syscall of SYSCALLS the profile denies unconditionally with SCMP_ACT_ERRNO, and its errno."""
    mentioned: dict[str, int] = {}
    denied: dict[str, int] = {}
    for rule in profile.get("syscalls") or []:
        names = rule.get("names") or [rule.get("name")]
        conditional = bool(rule.get("args") or rule.get("includes") or rule.get("excludes"))
        for name in names:
            mentioned[name] = mentioned.get(name, 0) + 1
            if rule.get("action") == "SCMP_ACT_ERRNO" and not conditional:
                denied[name] = int(rule.get("errnoRet", errno.EPERM))
    if profile.get("defaultAction") == "SCMP_ACT_ERRNO":  # default deny: anything no rule mentions
        default = int(profile.get("defaultErrnoRet", errno.EPERM))
        denied.update({name: default for name in SYSCALLS if name not in mentioned})
    for name, (_, _, natural) in SYSCALLS.items():
        if name in denied and mentioned.get(name, 0) <= 1 and denied[name] != natural and denied[name] > 0:
            return name, denied[name]
    return None


def call_script(name: str, nr: int) -> str:
    code = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
            "rc = libc.syscall(%d, 0, 0, 0, 0, 0, 0); "
            "print(\"call=%s\\ncall_rc=%%d\\ncall_errno=%%d\" %% (rc, ctypes.get_errno()))") % (nr, name)
    return f"if {HAS_PY}; then python3 -c '{code}'; else echo call=no-python3; fi"


def _plan(kernel: Any) -> tuple[str, tuple[str, int] | None, str]:
    """(expected mode, (syscall, errno) to prove denied or None, why not proven)."""
    security = kernel.settings.codex.sandbox.security
    if security.gvisor:
        entry = engine_facts(kernel).get("runtimes", {}).get("runsc") or {}
        if not seccomp_filters_enforced(entry):
            return "0", None, ("runsc is registered without --oci-seccomp, so no OCI seccomp profile reaches the "
                               "worker (mode 0); gVisor's Sentry serves its syscalls instead")
    arch = _ARCH.get(platform.machine().lower())
    if arch is None:
        return "2", None, f"no syscall numbers for {platform.machine()}"
    if not security.seccomp_profile:
        return "2", DEFAULT_DENIED, ""
    try:
        data = json.loads(load_profile(security.seccomp_profile)[0])
    except ProfileError as exc:
        return "2", None, str(exc)
    call = denied_call(data)
    if call is None:
        return "2", None, (f"the profile denies (SCMP_ACT_ERRNO, unconditionally) none of the syscalls this "
                           f"probe can call safely ({', '.join(SYSCALLS)})")
    if SYSCALLS[call[0]][arch] is None:
        return "2", None, f"{call[0]} does not exist on {platform.machine()}"
    return "2", call, ""


def make_judge(mode: str, call: tuple[str, int] | None, why: str, profile: str) -> Any:
    what = f"profile {profile}" if profile else "Docker's default profile"
    fix = ("set codex.sandbox.security.seccompProfile to a valid profile, or leave it empty for Docker's default; "
           "never seccomp=unconfined")

    def judge(out: str, rc: int) -> CheckResult:
        found = facts(out)
        got = found.get("Seccomp")
        if rc != 0 or got is None:
            return failed(ITEM, f"no Seccomp line in /proc/self/status (exit {rc}): {seen(out)}", fix)
        if mode == "0":  # gVisor without --oci-seccomp: nothing to hold the worker to
            return not_proven(ITEM, f"seccomp mode {got}; {why}",
                              "register runsc with --oci-seccomp so the profile applies inside gVisor too")
        if got != mode:
            return failed(ITEM, f"the worker runs with seccomp mode {got}, expected {mode} (filter) under {what}",
                          fix)
        if call is None:
            return not_proven(ITEM, f"seccomp mode {got}; {why}", "list a syscall this probe can call in the profile")
        name, err = call
        if found.get("call") == "no-python3":
            return not_proven(ITEM, f"seccomp mode 2, but the image has no python3 to call {name}",
                              "use a worker image with python3 (contrib/Dockerfile.sandbox)")
        result = (found.get("call_rc"), found.get("call_errno"))
        if found.get("call") != name or result != ("-1", str(err)):
            digits = bool(result[1] and result[1].isdigit())
            observed = f"rc={result[0]} errno={_name(int(result[1] or 0))}" if digits else seen(out)
            return failed(ITEM, f"seccomp mode 2, but {name}() is not denied as {what} says "
                          f"(expected {_name(err)}, got {observed})", fix)
        return passed(ITEM, f"seccomp mode 2; {name}() fails with {_name(err)} as {what} says")

    return judge


@hookimpl
def risoluto_doctor_probes(kernel: Any) -> list[Probe]:
    mode, call, why = _plan(kernel)
    script = "grep '^Seccomp:' /proc/self/status"
    if call is not None:
        nr = SYSCALLS[call[0]][_ARCH[platform.machine().lower()]]
        script += "; " + call_script(call[0], int(nr or 0))
    return [probe(ITEM, script, make_judge(mode, call, why, kernel.settings.codex.sandbox.security.seccomp_profile))]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["seccomp"]
