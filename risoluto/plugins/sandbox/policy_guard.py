"""Checklist rows "Host paths" / "Container paths": the last word on every sandbox spec.

A check-phase hook: it judges the final spec, after every plugin's edits and the egress
attach, and refuses (403 ``sandbox_policy_violation``) a spec that mounts DATA_DIR, master.key,
the Docker socket or ``~/.codex``, widens the container past the checklist, or lacks an item
that is switched on, whichever plugin made it so.
"""

from __future__ import annotations

from typing import Any

from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult
from ._guard import check_spec, exposed
from ._naming import workspace_root

ITEM = "sandbox mounts"


@hookimpl
def risoluto_sandbox_spec_check(kernel: Any, spec: Any, settings: Any) -> None:
    check_spec(spec, settings, kernel.environ)


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    root = workspace_root(kernel.settings)
    hit = exposed(str(root), kernel.settings, kernel.environ)
    if hit:
        return [CheckResult(
            item=ITEM, status=FAIL,
            reason=f"workspace.root {root} overlaps {hit}: every launch would be refused",
            fix="set workspace.root to a directory outside DATA_DIR, ~/.codex and /var/run",
        )]
    return [CheckResult(
        item=ITEM, status=PASS,
        reason="only /workspace (bind), /home/agent (volume), CODEX_HOME (volume) and /tmp (tmpfs) "
               "are mounted; DATA_DIR, master.key, the Docker socket and ~/.codex never are",
    )]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["sandbox policy check"]
