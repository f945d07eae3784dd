"""Checklist rows on resources, logs and the root filesystem.

memory / memoryReservation / memorySwap / cpus / pidsLimit -> Memory, MemoryReservation,
MemorySwap, NanoCpus, PidsLimit; tmpfsSize -> a ``/tmp`` tmpfs; logs -> LogConfig;
``readOnlyRootfs`` -> ReadonlyRootfs.
"""

from __future__ import annotations

from typing import Any

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult, Probe
from ...hookspecs.sandbox import Mount
from ...settings import parse_size
from ._probes import facts, failed, not_proven, passed, probe, seen, values

LOG_DRIVERS_WITH_ROTATION = ("json-file", "local")


def limits(settings: Any) -> dict[str, int]:
    r = settings.codex.sandbox.resources
    memory, reservation, swap = parse_size(r.memory), parse_size(r.memory_reservation), parse_size(r.memory_swap)
    if reservation > memory:
        raise ApiError(503, "sandbox_misconfigured",
                       "codex.sandbox.resources.memoryReservation is larger than memory.")
    if swap < memory:
        raise ApiError(503, "sandbox_misconfigured",
                       "codex.sandbox.resources.memorySwap must be at least memory (memory + swap).")
    return {
        "Memory": memory, "MemoryReservation": reservation, "MemorySwap": swap,
        "NanoCpus": int(r.cpus * 1e9), "PidsLimit": r.pids_limit,
    }


def log_config(settings: Any) -> dict[str, Any]:
    logs = settings.codex.sandbox.logs
    config: dict[str, str] = {}
    if logs.driver in LOG_DRIVERS_WITH_ROTATION:
        config = {"max-size": logs.max_size, "max-file": str(logs.max_file)}
    return {"Type": logs.driver, "Config": config}


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    sandbox = settings.codex.sandbox
    spec.host_config.update(limits(settings))
    spec.host_config["LogConfig"] = log_config(settings)
    spec.mounts.append(Mount(target="/tmp", type="tmpfs", tmpfs_size=parse_size(sandbox.resources.tmpfs_size)))
    spec.read_only_rootfs = sandbox.security.read_only_rootfs
    r, logs = sandbox.resources, sandbox.logs
    spec.policy["resources"] = {
        "memory": r.memory, "memoryReservation": r.memory_reservation, "memorySwap": r.memory_swap,
        "cpus": r.cpus, "pidsLimit": r.pids_limit, "tmpfsSize": r.tmpfs_size,
    }
    spec.policy["logs"] = {"driver": logs.driver, "maxSize": logs.max_size, "maxFile": logs.max_file}
    spec.policy["readOnlyRootfs"] = sandbox.security.read_only_rootfs


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    settings = kernel.settings
    out = []
    try:
        lim = limits(settings)
        out.append(CheckResult(
            item="sandbox resources", status=PASS,
            reason=f"memory {lim['Memory']} B, cpus {lim['NanoCpus'] / 1e9:g}, pids {lim['PidsLimit']}",
        ))
    except ApiError as err:
        out.append(CheckResult(item="sandbox resources", status=FAIL, reason=err.message,
                               fix="fix codex.sandbox.resources"))
    driver = settings.codex.sandbox.logs.driver
    rotated = driver in LOG_DRIVERS_WITH_ROTATION
    out.append(CheckResult(
        item="sandbox logs", status=PASS if rotated else WARN,
        reason=f"log driver {driver}" + (" with size rotation" if rotated else " (no size rotation set here)"),
        fix="" if rotated else "use json-file or local with maxSize/maxFile",
    ))
    ro = settings.codex.sandbox.security.read_only_rootfs
    out.append(CheckResult(
        item="sandbox read-only root", status=PASS if ro else WARN,
        reason="root filesystem is read-only" if ro else "root filesystem is writable (published default)",
        fix="" if ro else "set codex.sandbox.security.readOnlyRootfs: true",
    ))
    return out


# --- doctor --probe ------------------------------------------------------------------------
ROOT_ITEM, LIMITS_ITEM = "sandbox read-only root", "sandbox resources"
ROOT_SCRIPT = (
    "awk '$5 == \"/\" {print \"options=\" $6}' /proc/self/mountinfo; "
    "for d in / /etc /usr /var /opt; do if (: > \"$d/.risoluto-probe-$$\") 2>/dev/null; then "
    "rm -f \"$d/.risoluto-probe-$$\"; echo \"written=$d\"; fi; done; echo done=1"
)
# cgroup v2 files, else v1; what the worker's own cgroup says its limits are.
LIMITS_SCRIPT = (
    "c=/sys/fs/cgroup; "
    "if [ -f $c/memory.max ]; then echo memory=$(cat $c/memory.max); echo pids=$(cat $c/pids.max); "
    "echo cpu=$(cat $c/cpu.max | tr ' ' /); "
    "elif [ -f $c/memory/memory.limit_in_bytes ]; then echo memory=$(cat $c/memory/memory.limit_in_bytes); "
    "echo pids=$(cat $c/pids/pids.max); echo cpu=$(cat $c/cpu/cpu.cfs_quota_us)/$(cat $c/cpu/cpu.cfs_period_us); "
    "else echo cgroup=none; fi"
)


def judge_root(out: str, rc: int) -> CheckResult:
    found = facts(out)
    options = found.get("options", "").split(",")
    written = values(out, "written")
    if rc != 0 or found.get("done") != "1" or options == [""]:
        return failed(ROOT_ITEM, f"unexpected probe output (exit {rc}): {seen(out)}", "re-run the probe")
    if "ro" not in options or written:
        return failed(ROOT_ITEM, f"readOnlyRootfs is on but / is mounted {','.join(options)}"
                      + (f" and the worker wrote to {', '.join(written)}" if written else ""),
                      "check codex.sandbox.security.readOnlyRootfs and plugins that edit the spec")
    return passed(ROOT_ITEM, "/ is mounted read-only inside the canary; writes to /, /etc, /usr, /var, /opt fail")


def _same(key: str, seen_value: int, configured: int) -> bool:
    if key == "Memory":  # the kernel rounds a memory limit down to whole pages
        return configured - 65536 < seen_value <= configured
    return seen_value == configured


def make_limits_judge(expected: dict[str, int]) -> Any:
    def judge(out: str, rc: int) -> CheckResult:
        found = facts(out)
        if found.get("cgroup") == "none":
            return not_proven(LIMITS_ITEM, "the canary sees no cgroup files (gVisor hides them)",
                              "check `docker inspect` of a worker for Memory, NanoCpus and PidsLimit")
        try:
            quota, period = (int(v) for v in found["cpu"].split("/"))
            seen_limits = {"Memory": int(found["memory"]), "PidsLimit": int(found["pids"]),
                           "NanoCpus": quota * 1_000_000_000 // period}
        except (KeyError, ValueError, ZeroDivisionError):
            return failed(LIMITS_ITEM, f"the canary's cgroup has no limit where one is configured (exit {rc}): "
                          f"{seen(out)}", "check codex.sandbox.resources and the engine's cgroup support")
        wrong = [f"{k} {seen_limits[k]} (configured {v})" for k, v in expected.items()
                 if not _same(k, seen_limits[k], v)]
        if wrong:
            return failed(LIMITS_ITEM, "the canary's cgroup limits differ: " + ", ".join(wrong),
                          "check codex.sandbox.resources and plugins that edit host_config")
        return passed(LIMITS_ITEM, f"cgroup limits inside the canary: memory {seen_limits['Memory']} B, "
                      f"cpus {seen_limits['NanoCpus'] / 1e9:g}, pids {seen_limits['PidsLimit']}")

    return judge


@hookimpl
def risoluto_doctor_probes(kernel: Any) -> list[Probe]:
    settings = kernel.settings
    try:
        lim = limits(settings)
    except ApiError:
        return []  # the launch is refused anyway; the check reports why
    probes = [probe(LIMITS_ITEM, LIMITS_SCRIPT,
                    make_limits_judge({k: lim[k] for k in ("Memory", "NanoCpus", "PidsLimit")}))]
    if settings.codex.sandbox.security.read_only_rootfs:
        probes.append(probe(ROOT_ITEM, ROOT_SCRIPT, judge_root))
    return probes


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["resource limits"]
