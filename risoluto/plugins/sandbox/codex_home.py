"""Checklist rows "Container paths" / "Sandbox policy": HOME and the per-attempt CODEX_HOME.

``/home/agent`` is a per-issue named volume (build caches survive attempts).
``/home/agent/.codex-runtime`` is a fresh volume per attempt (so it starts empty and is
removed after the container; the runtime names it for its instance) holding ``config.toml``, derived from ``threadSandbox`` and
``turnSandboxPolicy``, and ``auth.json`` copied from ``codex.authDir`` when it exists.
Both files are put in through the Engine API: ``~/.codex`` itself is never mounted.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import PASS, WARN, CheckResult
from ...hookspecs.sandbox import Mount
from ._naming import (
    CODEX_HOME, CONTAINER_HOME, LABEL_ISSUE, LABEL_SCOPE, SCOPE_ATTEMPT, WORKSPACE, auth_dir, home_volume, issue_key,
)

ITEM = "sandbox codex home"
MAX_AUTH_BYTES = 1024 * 1024
# Strictest first: the effective Codex sandbox is the stricter of thread and turn policy.
_MODES = ("read-only", "workspace-write", "danger-full-access")
_THREAD = {"workspace-read": "read-only", "workspace-write": "workspace-write",
           "danger-full-access": "danger-full-access"}
_TURN = {"readOnly": "read-only", "workspaceWrite": "workspace-write", "dangerFullAccess": "danger-full-access"}


def sandbox_mode(settings: Any) -> str:
    codex = settings.codex
    thread, turn = _THREAD[codex.thread_sandbox], _TURN[codex.turn_sandbox_policy.type]
    return min(thread, turn, key=_MODES.index)


def config_toml(settings: Any) -> str:
    """Codex CLI config: ``sandbox_mode`` and ``[sandbox_workspace_write]``."""
    codex = settings.codex
    mode = sandbox_mode(settings)
    lines = [
        "# Written by risoluto for one attempt: do not edit (re-created at every launch).",
        f"# threadSandbox = {codex.thread_sandbox}; turnSandboxPolicy.type = {codex.turn_sandbox_policy.type}",
        f'sandbox_mode = "{mode}"',
    ]
    if mode == "workspace-write":
        network = "true" if codex.turn_sandbox_policy.network_access else "false"
        lines += ["", "[sandbox_workspace_write]", f"network_access = {network}",
                  f'writable_roots = ["{WORKSPACE}"]']
    return "\n".join(lines) + "\n"


def read_auth(settings: Any) -> bytes | None:
    """``auth.json`` from the auth directory, or None when there is none."""
    path = auth_dir(settings) / "auth.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ApiError(503, "codex_auth_unreadable", f"cannot read {path}: {exc.strerror}.") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ApiError(503, "codex_auth_unreadable", f"{path} is not a regular file.")
        data = fh.read(MAX_AUTH_BYTES + 1)
    if len(data) > MAX_AUTH_BYTES:
        raise ApiError(503, "codex_auth_unreadable", f"{path} is larger than 1 MiB.")
    return data


@hookimpl
def risoluto_sandbox_spec(spec: Any, request: Any, settings: Any) -> None:
    key = "preview" if request.dry_run else issue_key(request.issue)
    spec.mounts.append(Mount(target=CONTAINER_HOME, source=home_volume(key, settings), type="volume",
                             labels={LABEL_SCOPE: "issue", LABEL_ISSUE: request.issue}))
    # No source: a new, empty volume for every container, removed after it (the runtime names it).
    spec.mounts.append(Mount(target=CODEX_HOME, source="", type="volume", labels={LABEL_SCOPE: SCOPE_ATTEMPT}))
    spec.env["HOME"] = CONTAINER_HOME
    spec.env["CODEX_HOME"] = CODEX_HOME
    spec.files[CODEX_HOME + "/"] = b""  # the directory itself, owned by the container user
    spec.files[CODEX_HOME + "/config.toml"] = config_toml(settings).encode()
    auth = None if request.dry_run else read_auth(settings)
    if auth is not None:
        spec.files[CODEX_HOME + "/auth.json"] = auth
    turn = settings.codex.turn_sandbox_policy
    spec.policy["turnSandboxPolicy"] = {"type": turn.type, "networkAccess": turn.network_access}
    spec.policy["codexSandboxMode"] = sandbox_mode(settings)


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    path = auth_dir(kernel.settings) / "auth.json"
    mode = sandbox_mode(kernel.settings)
    if path.is_file():
        return [CheckResult(item=ITEM, status=PASS,
                            reason=f"CODEX_HOME is fresh per attempt (sandbox_mode {mode}); {path} is copied in")]
    return [CheckResult(item=ITEM, status=WARN,
                        reason=f"CODEX_HOME is fresh per attempt (sandbox_mode {mode}); no {path} to copy",
                        fix="run `codex login` as the kernel user, or set codex.authDir")]
