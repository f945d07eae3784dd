"""Checklist rows "Host paths" / "Container paths": the issue workspace at ``/workspace``.

``<workspace.root>/<sanitised issue>`` is created on dispatch (with the root when missing),
owned by the container user, and bind-mounted at ``/workspace``: read-write, or read-only
when ``codex.threadSandbox`` is ``workspace-read``. An existing workspace is kept as it is
(never wiped): it is the agent's work, and the kernel never changes the owner or mode of a
directory it did not create, so one owned by a user who is neither the kernel's nor the
sandbox's is refused (409 ``workspace_not_owned``) and left untouched.

A root the kernel refuses (``_workspaces.root_problem``: a system directory, Docker's data
root, DATA_DIR, the kernel's code, a directory others may write to) is a configuration error
at startup, a FAIL in the doctor, and 503 ``workspace_unavailable`` at launch.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
import shlex
import stat
from pathlib import Path
from typing import Any, AsyncIterator

from ...errors import ApiError, ConfigError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult, Probe
from ...hookspecs.sandbox import Mount
from ._guard import forbidden_paths, overlaps
from ._naming import LABEL_WORKSPACE, WORKSPACE, container_user, issue_key, workspace_root
from ._probes import failed, facts, passed, probe, seen, values
from ._workspaces import FIX, record_made, root_problem

ITEM = "sandbox workspace"


def ensure_workspace(settings: Any, key: str) -> Path:
    problem = root_problem(settings, os.environ)
    if problem is not None:
        raise ApiError(503, "workspace_unavailable", f"{problem}; {FIX}.")
    root = workspace_root(settings)
    try:
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise ApiError(503, "workspace_unavailable",
                       f"cannot create workspace.root {root}: {exc.strerror or exc}; fix workspace.root.") from None
    if not root.is_dir():
        raise ApiError(503, "workspace_unavailable", f"workspace.root {root} is not a directory; fix workspace.root.")
    path = root / key  # key has no "/" and no leading ".": always a direct child of root
    uid, gid = container_user(settings)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return _existing(path, uid)
    record_made(path)  # this launch made it: a failed launch takes it back
    if os.geteuid() == 0 and (uid, gid) != (os.geteuid(), os.getegid()):
        os.chown(path, uid, gid, follow_symlinks=False)  # ours, just made: given to the container user
    return path


def _existing(path: Path, sandbox_uid: int) -> Path:
    """An existing workspace, used as it is: never chowned or chmodded."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        # A symlink here could point the bind mount anywhere on the host.
        raise ApiError(409, "workspace_invalid", f"{path} exists and is not a directory; move it away.")
    if st.st_uid not in (os.geteuid(), sandbox_uid):
        raise ApiError(409, "workspace_not_owned",
                       f"{path} exists and belongs to uid {st.st_uid}, neither the kernel's user ({os.geteuid()}) nor "
                       f"the sandbox user ({sandbox_uid}); it was left unchanged. Move it away, or give it to one "
                       "of them if it is really this issue's workspace.")
    return path


@hookimpl
def risoluto_settings_validate(settings: Any) -> None:
    """A refused ``workspace.root`` stops startup (and ``config check``) naming the key."""
    problem = root_problem(settings, os.environ)
    if problem is not None:
        raise ConfigError(f"{problem}. {FIX[0].upper()}{FIX[1:]}.")


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    read_only = settings.codex.thread_sandbox == "workspace-read"
    spec.policy["threadSandbox"] = settings.codex.thread_sandbox
    spec.policy["workspaceReadOnly"] = read_only
    spec.working_dir = WORKSPACE
    if request.dry_run:
        source = workspace_root(settings) / "ISSUE"
    else:
        source = ensure_workspace(settings, issue_key(request.issue))
    spec.mounts.append(Mount(target=WORKSPACE, source=str(source), type="bind", read_only=read_only))
    spec.labels[LABEL_WORKSPACE] = str(source)


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    root = workspace_root(kernel.settings)
    problem = root_problem(kernel.settings, kernel.environ)
    if problem is not None:
        return [CheckResult(item=ITEM, status=FAIL, reason=problem, fix=FIX)]
    if root.exists() and not root.is_dir():
        return [CheckResult(item=ITEM, status=FAIL, reason=f"workspace.root {root} is not a directory",
                            fix="set workspace.root to a directory")]
    mode = kernel.settings.codex.thread_sandbox
    rw = "read-only" if mode == "workspace-read" else "read-write"
    where = "exists" if root.exists() else "will be created at the first launch"
    return [CheckResult(item=ITEM, status=PASS, reason=f"{root} {where}; /workspace is {rw} ({mode})")]


# --- doctor --probe ------------------------------------------------------------------------
HIDDEN = "sandbox hidden paths"
MARKER_ENV = "RISOLUTO_PROBE_MARKER"
PSEUDO_FS = "proc|sysfs|devpts|mqueue|cgroup|cgroup2|securityfs|debugfs|tracefs|pstore|bpf|configfs"
# Every mount of the canary: "mount=<dev> <root> <mount point> <fstype>"; then, below each mount
# that is not a kernel pseudo filesystem, the marker files dropped in DATA_DIR and ~/.codex
# and any Docker/containerd socket (4 levels deep).
_FSTYPE = "for (i = 7; i < NF && $i != \"-\"; i++);"  # mountinfo: the file system type follows "-"
SCAN = (
    "awk '{" + _FSTYPE + " print \"mount=\" $3 \" \" $4 \" \" $5 \" \" $(i+1)}' /proc/self/mountinfo; "
    "awk '{" + _FSTYPE + " if ($(i+1) !~ /^(" + PSEUDO_FS + ")$/) print $5}' /proc/self/mountinfo "
    "| while read -r m; do find \"$m\" -xdev -maxdepth 4 \\( -name \"$" + MARKER_ENV + "\" -o -name docker.sock "
    "-o -name containerd.sock \\) -print 2>/dev/null | sed 's/^/found=/'; done; echo scan=done"
)


def host_mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(device "major:minor", path inside that filesystem) of an existing host path."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str, str] | None = None
    for line in lines:
        fields = line.split()
        dev, root, point = fields[2], fields[3], fields[4].replace("\\040", " ")
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= best[0]:  # the longest (then the latest) mount point wins
                rest = path[len(point.rstrip("/")):]
                best = (len(point), dev, posixpath.normpath(root.rstrip("/") + rest or "/"))
    return (best[1], best[2]) if best else None


def make_hidden_judge(paths: dict[str, str], host: dict[str, tuple[str, str]], marks: dict[str, str],
                      compare_devices: bool) -> Any:
    fix = ("remove the plugin or volume that exposes it; DATA_DIR, master.key, ~/.codex and the Docker socket "
           "never reach a worker")

    def judge(out: str, rc: int) -> CheckResult:
        lines = out.splitlines()
        if rc != 0 or "scan=done" not in lines:
            return failed(HIDDEN, f"the scan did not complete (exit {rc}): {seen(out)}",
                          "re-run; check the canary image")
        leaks = [f"{name} visible at {path}" for name, path in paths.items() if f"visible={path}" in lines]
        found = values(out, "found")
        for hit in found:
            name = next((n for n, m in marks.items() if posixpath.basename(hit) == m), "a Docker socket")
            leaks.append(f"{name} reachable at {hit}")
        mounts = [value.split() for value in values(out, "mount")]
        if not mounts:
            return failed(HIDDEN, f"no mount table in the canary's output: {seen(out)}", "re-run")
        if compare_devices:  # runc: the canary's mount table names host devices (gVisor's does not)
            for dev, root, point, *_ in mounts:
                for name, (host_dev, rel) in host.items():
                    if dev == host_dev and overlaps(root, rel):
                        leaks.append(f"{point} mounts {root} of device {dev}, which holds {name}")
        if leaks:
            return failed(HIDDEN, "; ".join(sorted(set(leaks)))[:400], fix)
        how = "marker files not found" if marks else "no marker could be placed"
        devices = "; no mount of their devices" if compare_devices else ""
        return passed(HIDDEN, f"{len(paths)} host paths (DATA_DIR, master.key, ~/.codex, Docker sockets) not "
                      f"visible; {how} under {len(mounts)} mounts{devices}")

    return judge


@hookimpl
def risoluto_doctor_probes(kernel: Any) -> list[Probe]:
    settings = kernel.settings
    paths = {name: str(path) for name, path in forbidden_paths(settings, kernel.environ).items()}
    host = {name: found for name, path in paths.items() if os.path.exists(path) and (found := host_mount_of(path))}
    marker = f".risoluto-probe-{secrets.token_hex(8)}"
    marks: dict[str, str] = {}

    @contextlib.asynccontextmanager
    async def markers(kernel: Any) -> AsyncIterator[dict[str, str]]:
        """Drop a marker file in DATA_DIR and ~/.codex (when they exist) for the canary to look for."""
        made: list[Path] = []
        for name in ("DATA_DIR", "~/.codex"):
            target = Path(paths[name]) / marker
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except OSError:
                continue  # missing or read-only: the other checks still run
            os.close(fd)
            made.append(target)
            marks[name] = marker
        try:
            yield {MARKER_ENV: marker}
        finally:
            for target in made:
                with contextlib.suppress(OSError):
                    target.unlink()

    checks = "; ".join(f"if [ -e {shlex.quote(p)} ] || [ -L {shlex.quote(p)} ]; then echo visible={p}; fi"
                       for p in sorted(set(paths.values())))
    hidden = probe(HIDDEN, f"{checks}; {SCAN}",
                   make_hidden_judge(paths, host, marks, not settings.codex.sandbox.security.gvisor), markers)
    read_only = settings.codex.thread_sandbox == "workspace-read"
    access = probe(ITEM, WORKSPACE_SCRIPT, make_workspace_judge(read_only, settings.codex.thread_sandbox))
    return [hidden, access]


WORKSPACE_SCRIPT = (
    "f=/workspace/.risoluto-probe-$$; if (: > \"$f\") 2>/dev/null; then rm -f \"$f\"; echo write=ok; "
    "else echo write=denied; fi; "
    "awk '$5 == \"/workspace\" {print \"options=\" $6}' /proc/self/mountinfo; echo cwd=$(pwd)"
)


def make_workspace_judge(read_only: bool, mode: str) -> Any:
    def judge(out: str, rc: int) -> CheckResult:
        found = facts(out)
        options = found.get("options", "").split(",")
        write = found.get("write")
        if rc != 0 or not write or options == [""]:
            return failed(ITEM, f"/workspace is not mounted or the probe failed (exit {rc}): {seen(out)}",
                          "check workspace.root and the sandbox.workspace plugin")
        if read_only and (write != "denied" or "ro" not in options):
            return failed(ITEM, f"threadSandbox is {mode} but /workspace is writable (write={write}, "
                          f"mount {','.join(options)})", "check codex.threadSandbox and plugins that edit mounts")
        if not read_only and (write != "ok" or "rw" not in options):
            return failed(ITEM, f"threadSandbox is {mode} but the worker cannot write /workspace (write={write}, "
                          f"mount {','.join(options)})",
                          "let the container user own the workspace (codex.sandbox.user) or run the kernel as root")
        state = "read-only" if read_only else "writable"
        return passed(ITEM, f"/workspace is {state} inside the canary ({mode}); working directory {found.get('cwd')}")

    return judge


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["workspace"]
