"""Checklist rows on resources, logs and the root filesystem.

memory / memoryReservation / memorySwap / cpus / pidsLimit -> Memory, MemoryReservation,
MemorySwap, NanoCpus, PidsLimit; tmpfsSize -> a ``/tmp`` tmpfs; logs -> LogConfig;
``readOnlyRootfs`` -> ReadonlyRootfs.
"""

from __future__ import annotations

from typing import Any

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from ...hookspecs.sandbox import Mount
from ...settings import parse_size

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
