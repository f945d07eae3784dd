"""Whether a live kernel owns this DATA_DIR's sandboxes, and the doctor item that asks (not a plugin).

Every process that runs sandboxes of a DATA_DIR (the server, a data plane, ``risoluto sandbox
run``, ``risoluto doctor --probe``) holds a shared ``flock`` on ``<DATA_DIR>/sandbox.owner.lock``
while its runtime is installed. The operating system drops the lock when the process ends,
however it ends (``kill -9`` included), so no stale pid can fool the check. ``risoluto doctor``
tries an exclusive lock without waiting: when it gets one, no live process owns the DATA_DIR's
sandboxes, and every container of this instance still on the engine is an orphan (removed at
the next start, or by hand).

``flock`` rather than ``fcntl`` locks: closing any descriptor of a file drops every ``fcntl``
lock the process holds on it; a ``flock`` belongs to its own open file description.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

from ... import docker_transport
from ...fsutil import ensure_private_dir
from ...hookspecs.doctor import PASS, WARN, CheckResult
from ._engine import facts_timeout
from ._naming import LABEL_INSTANCE, LABEL_ISSUE, LABEL_SCOPE, SCOPE_ATTEMPT, attempt_volume_prefix, instance_id
from ._prepared import LABEL_CARRIER

log = logging.getLogger("risoluto.sandbox")
LOCK_NAME = "sandbox.owner.lock"
ITEM = "sandbox orphans"
_STATE = "sandbox.owner_fd"
SHOWN = 5  # names quoted in the doctor's reason; the fix lists them all


def hold(kernel: Any) -> None:
    """Take this process's share of the owner lock (kept until :func:`release`)."""
    if kernel.state.get(_STATE) is not None:
        return
    path = ensure_private_dir(kernel.settings.data_path) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    for _ in range(50):  # a doctor holds its exclusive try for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            kernel.state[_STATE] = fd
            return
        except BlockingIOError:
            time.sleep(0.02)
    os.close(fd)
    log.warning("%s is held exclusively by another process; the doctor may report this kernel's "
                "sandboxes as orphans", path)


def release(kernel: Any) -> None:
    fd = kernel.state.pop(_STATE, None)
    if fd is not None:
        os.close(fd)  # drops the lock


def live_owner(data_path: Path) -> bool:
    """True while some process holds the owner lock of ``data_path``; OSError when the lock
    file cannot be opened (another user's DATA_DIR)."""
    try:
        fd = os.open(data_path / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False  # no kernel has run sandboxes here since the file was made
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the exclusive lock, if taken
    return False


def doctor_item(kernel: Any, facts: dict[str, Any]) -> CheckResult:
    """WARN when containers or attempt volumes of this DATA_DIR are on the engine and no live
    kernel owns them (the server crashed or was killed, and has not been started again)."""
    try:
        if live_owner(kernel.settings.data_path):
            return CheckResult(item=ITEM, status=PASS, reason="a running kernel of this DATA_DIR owns its sandboxes")
    except OSError as exc:
        return CheckResult(item=ITEM, status=WARN, reason=f"not checked: cannot open {LOCK_NAME} ({exc.strerror})",
                           fix="run the doctor as the user the kernel runs as")
    if not facts["ok"]:
        return CheckResult(item=ITEM, status=WARN, reason=f"not checked: Docker is {facts['error']}",
                           fix="start Docker, then run the doctor again")
    try:
        containers, volumes = _leftovers(kernel)
    except Exception as exc:  # the doctor reports, never raises
        return CheckResult(item=ITEM, status=WARN, reason=f"not checked: listing failed ({type(exc).__name__})",
                           fix="check the Docker engine, then run the doctor again")
    if not containers and not volumes:
        return CheckResult(item=ITEM, status=PASS, reason="no kernel runs on this DATA_DIR and none of its "
                           "sandboxes is left on the engine")
    shown = ", ".join(containers[:SHOWN]) + (", ..." if len(containers) > SHOWN else "")
    what = f"{len(containers)} container(s) ({shown})" if containers else ""
    if volumes:
        what += f"{' and ' if what else ''}{len(volumes)} per-attempt volume(s)"
    steps = []
    if containers:
        steps.append("docker rm -f " + " ".join(c.split(" ")[0] for c in containers))
    if volumes:
        steps.append("docker volume rm " + " ".join(volumes))
    return CheckResult(
        item=ITEM, status=WARN,
        reason=f"{what} of this DATA_DIR are on the engine and no kernel runs on it (it crashed or was killed)",
        fix="start `risoluto serve` with this DATA_DIR (it removes them at start), or remove them: "
            + "; ".join(steps))


def _leftovers(kernel: Any) -> tuple[list[str], list[str]]:
    """("name (issue, state)" of each container or carrier, names of attempt volumes)."""
    instance = instance_id(kernel.settings)
    client = docker_transport.from_env(kernel.environ, timeout=facts_timeout(kernel)).api
    try:
        rows = client.containers(all=True, filters={"label": [f"{LABEL_INSTANCE}={instance}"]})
        rows += client.containers(all=True, filters={"label": [f"{LABEL_CARRIER}={instance}"]})
        vols = client.volumes().get("Volumes") or []
    finally:
        with contextlib.suppress(Exception):
            client.close()
    containers = []
    for row in rows:
        name = (row.get("Names") or ["/?"])[0].lstrip("/")
        issue = (row.get("Labels") or {}).get(LABEL_ISSUE, "")
        containers.append(f"{name} ({'issue ' + issue + ', ' if issue else ''}{row.get('State', '?')})")
    prefix = attempt_volume_prefix(instance)
    volumes = [v["Name"] for v in vols if v["Name"].startswith(prefix) or (
        (v.get("Labels") or {}).get(LABEL_INSTANCE) == instance
        and (v.get("Labels") or {}).get(LABEL_SCOPE) == SCOPE_ATTEMPT)]
    return containers, volumes
