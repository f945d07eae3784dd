"""``secrets.audit.log``: one NDJSON line per secret change (docs/secrets.md; the original's format plus fields).

``{"at", "operation", "key", "principal", "remote", "backend"}``: never a value (the event
does not carry one). Written as hook implementations, so the stores stay unaware of it
and another plugin can ship the same events elsewhere.

A ``set`` or ``delete`` is recorded AHEAD of the change (``risoluto_secret_changing``): the
line is appended whole and fsynced before the store is touched, and truncated away again if
the change then fails, so no change is acknowledged without its line. A line that cannot be
appended (a full disk, a read-only file) refuses the change: 507 ``insufficient_storage`` or
503 ``audit_unavailable``. A crash between the line and the change may leave a line for a
change that was never made; never the reverse. ``rotate`` and ``migrate`` (CLI) are recorded
after the fact (``risoluto_secret_changed``).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from risoluto.fsutil import LineAppend, append_line, append_problem, is_full
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, CheckResult
from risoluto.hookspecs.secrets import AuditUnavailable, StorageFull

if TYPE_CHECKING:
    from risoluto.hookspecs.secrets import SecretEvent
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings

LOG_NAME = "secrets.audit.log"
log = logging.getLogger("risoluto.secrets")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


WRITTEN_AHEAD = frozenset({"set", "delete"})


def _line(event: SecretEvent) -> str:
    return json.dumps({
        "at": _now(), "operation": event.operation, "key": event.key,
        "principal": event.principal, "remote": event.remote, "backend": event.backend,
    }, ensure_ascii=False)


@hookimpl
def risoluto_secret_changing(event: SecretEvent, settings: Settings) -> Callable[[bool], None] | None:
    if event.operation not in WRITTEN_AHEAD:
        return None
    path = settings.data_path / LOG_NAME
    try:
        pending = LineAppend(path, _line(event), sync=True)
    except OSError as exc:
        log.error("cannot append to %s (%s): the %s is refused", path, exc.strerror or exc, event.operation)
        if is_full(exc):
            raise StorageFull(f"{path}: no space left for the audit line") from None
        raise AuditUnavailable(f"{path}: {exc.strerror or exc}") from None

    def finish(durable: bool) -> None:
        if durable:
            pending.keep()
        else:
            pending.take_back()

    return finish


@hookimpl
def risoluto_secret_changed(event: SecretEvent, settings: Settings) -> None:
    if event.operation in WRITTEN_AHEAD:
        return  # recorded before the change
    path = settings.data_path / LOG_NAME
    try:
        append_line(path, _line(event), sync=True)
    except OSError as exc:  # must not raise: the rotation itself is already durable
        log.error("cannot append to %s: %s", path, exc.strerror or exc)


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    item = "credential encryption: audit log"
    path = kernel.settings.data_path / LOG_NAME
    problem = append_problem(path)
    if problem is not None:
        return [CheckResult(item=item, status=FAIL, reason=f"{problem}: secret sets and deletes are refused",
                            fix=f"free space on that file system, or make {path} a regular file owned by the "
                                "kernel's user, mode 0600")]
    where = "is appended to" if path.exists() else "will be appended to (created 0600)"
    return [CheckResult(item=item, status=PASS, reason=f"every set/delete {where} {path} before it is made")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["secrets audit log"]
