"""Checklist support for a split deployment: selects the ``remote`` sandbox runtime
(``sandbox.runtime: remote``; the runtime is ``_remote.RemoteRuntime``) and reports the data-plane
link to the doctor (``_remote_doctor``)."""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ._remote import RemoteRuntime
from ._remote_doctor import checks


@hookimpl
def risoluto_sandbox_runtime(settings: Any) -> RemoteRuntime | None:
    return RemoteRuntime(settings) if settings.sandbox.runtime == "remote" else None


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[Any]:
    return checks(kernel)
