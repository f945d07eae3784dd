"""Checklist rows "Host paths" / "Container paths": the issue workspace at ``/workspace``.

``<workspace.root>/<sanitised issue>`` is created on dispatch (with the root when missing),
owned by the container user, and bind-mounted at ``/workspace``: read-write, or read-only
when ``codex.threadSandbox`` is ``workspace-read``. An existing workspace is kept as it is
(never wiped): it is the agent's work.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult
from ...hookspecs.sandbox import Mount
from ._naming import LABEL_WORKSPACE, WORKSPACE, container_user, issue_key, workspace_root

ITEM = "sandbox workspace"


def ensure_workspace(settings: Any, key: str) -> Path:
    root = workspace_root(settings)
    try:
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise ApiError(503, "workspace_unavailable",
                       f"cannot create workspace.root {root}: {exc.strerror or exc}; fix workspace.root.") from None
    if not root.is_dir():
        raise ApiError(503, "workspace_unavailable", f"workspace.root {root} is not a directory; fix workspace.root.")
    path = root / key  # key has no "/" and no leading ".": always a direct child of root
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        # A symlink here could point the bind mount anywhere on the host.
        raise ApiError(409, "workspace_invalid", f"{path} exists and is not a directory; move it away.")
    uid, gid = container_user(settings)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)
    return path


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
    if root.exists() and not root.is_dir():
        return [CheckResult(item=ITEM, status=FAIL, reason=f"workspace.root {root} is not a directory",
                            fix="set workspace.root to a directory")]
    mode = kernel.settings.codex.thread_sandbox
    rw = "read-only" if mode == "workspace-read" else "read-write"
    where = "exists" if root.exists() else "will be created at the first launch"
    return [CheckResult(item=ITEM, status=PASS, reason=f"{root} {where}; /workspace is {rw} ({mode})")]
