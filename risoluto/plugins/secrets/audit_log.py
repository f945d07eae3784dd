"""``secrets.audit.log``: one NDJSON line per secret change (SPEC 3.1, compat + extra fields).

``{"at", "operation", "key", "principal", "remote", "backend"}``: never a value (the event
does not carry one). Written as a hook implementation, so the stores stay unaware of it
and another plugin can ship the same events elsewhere. Each line is one ``write`` on an
``O_APPEND`` descriptor followed by ``fsync``: the trail survives a crash as well as the
change it records does.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from risoluto.fsutil import ensure_private_dir
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, CheckResult

if TYPE_CHECKING:
    from risoluto.hookspecs.secrets import SecretEvent
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings

LOG_NAME = "secrets.audit.log"
log = logging.getLogger("risoluto.secrets")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def append_durably(path: os.PathLike[str] | str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


@hookimpl
def risoluto_secret_changed(event: SecretEvent, settings: Settings) -> None:
    entry = {
        "at": _now(), "operation": event.operation, "key": event.key,
        "principal": event.principal, "remote": event.remote, "backend": event.backend,
    }
    path = settings.data_path / LOG_NAME
    try:
        ensure_private_dir(path.parent)
        append_durably(path, json.dumps(entry, ensure_ascii=False))
    except OSError as exc:  # must not raise: the change itself is already durable
        log.error("cannot append to %s: %s", path, exc.strerror)


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    item = "credential encryption: audit log"
    path = kernel.settings.data_path / LOG_NAME
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [CheckResult(item=item, status=PASS, reason=f"{path} is created 0600 on the first change")]
    except OSError as exc:
        return [CheckResult(item=item, status=FAIL, reason=f"{path}: {exc.strerror}", fix="fix its permissions")]
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.W_OK):
        return [CheckResult(item=item, status=FAIL, reason=f"{path} is not a writable regular file",
                            fix=f"make {path} a regular file owned by the kernel's user, mode 0600")]
    return [CheckResult(item=item, status=PASS, reason=f"every set/delete is appended to {path}")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["secrets audit log"]
