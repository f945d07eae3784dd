"""The sandbox HTTP API (docs/sandbox.md) and its service (``_runtime_service``).

``POST /api/v1/sandboxes`` answers 201 once the container has started; the wait for its
exit, the stop at ``timeout_s`` and the removal run in the background. ``"wait": true``
makes the request return after the exit instead (for short jobs). The service never fails
app startup when Docker is absent: sandbox routes then answer 503
``sandbox_runtime_unavailable`` until the engine answers.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from quart import Blueprint

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...openapi import api
from ...requests import json_object
from ._launcher import effective_policy, launch, parse_launch
from ._runtime_service import SandboxService
from ._naming import checked_id

log = logging.getLogger("risoluto.sandbox")
_STR = {"type": "string"}
LAUNCH = {
    "type": "object", "required": ["issue"], "additionalProperties": False,
    "properties": {
        "issue": {"type": "string", "minLength": 1, "maxLength": 200},
        "command": {"type": "array", "items": _STR, "maxItems": 1000},
        "image": _STR,
        "env": {"type": "object", "additionalProperties": _STR},
        "secrets": {"type": "array", "items": _STR},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "wait": {"type": "boolean"},
    },
}
RECORD = {
    "type": "object", "required": ["id", "name", "status"],
    "properties": {
        "id": _STR, "name": _STR, "issue": _STR,
        "status": {"enum": ["created", "running", "exited", "timed_out", "stopped", "failed", "removed"]},
        "exit_code": {"type": ["integer", "null"]}, "oom_killed": {"type": "boolean"},
        "timed_out": {"type": "boolean"}, "env_keys": {"type": "array", "items": _STR},
        "removed": {"type": "boolean"}, "removal": {"enum": ["", "pending", "done"]},
        "policy_digest": _STR, "policy": {"type": "object"},
    },
}
POLICY = {"type": "object", "required": ["launchable"],
          "properties": {"launchable": {"type": "boolean"}, "policy": {"type": "object"}, "policy_digest": _STR}}


def _runtime(kernel: Any) -> Any:
    runtime = kernel.backends.runtime
    if runtime is None:
        raise ApiError(503, "sandbox_runtime_unavailable",
                       "No sandbox runtime is available; start Docker and check sandbox.runtime.")
    return runtime


def blueprint(kernel: Any) -> Blueprint:
    bp = Blueprint("risoluto_sandbox", __name__)

    @bp.post("/api/v1/sandboxes")
    @api("Launch a sandbox (201 once started; with wait: true once exited)", request=LAUNCH,
         responses={201: RECORD}, tags=("sandbox",))
    async def create() -> Any:
        request, wait = parse_launch(await json_object())
        return await launch(kernel, request, wait=wait), 201

    @bp.get("/api/v1/sandboxes")
    @api("Sandboxes of this kernel (env keys only, never values)", tags=("sandbox",),
         responses={200: {"type": "object", "properties": {"sandboxes": {"type": "array", "items": RECORD}}}})
    async def index() -> Any:
        return {"sandboxes": await _runtime(kernel).list()}

    @bp.get("/api/v1/sandboxes/<sandbox_id>")
    @api("One sandbox: status, exit code, OOM flag", responses={200: RECORD}, tags=("sandbox",))
    async def show(sandbox_id: str) -> Any:
        return await _runtime(kernel).inspect(checked_id(sandbox_id))

    @bp.get("/api/v1/sandboxes/<sandbox_id>/logs")
    @api("Output of a sandbox (stdout and stderr interleaved)", tags=("sandbox",),
         responses={200: {"type": "object", "properties": {"id": _STR, "logs": _STR}}})
    async def logs(sandbox_id: str) -> Any:
        runtime = _runtime(kernel)
        text = await runtime.logs(checked_id(sandbox_id))
        return {"id": sandbox_id, "logs": text}

    @bp.delete("/api/v1/sandboxes/<sandbox_id>")
    @api("Stop (with grace) and remove a sandbox", responses={200: RECORD}, tags=("sandbox",))
    async def remove(sandbox_id: str) -> Any:
        return await _runtime(kernel).remove(checked_id(sandbox_id))

    @bp.get("/api/v1/sandbox/policy")
    @api("The effective sandbox policy in the checklist's terms", responses={200: POLICY}, tags=("sandbox",))
    async def policy() -> Any:
        return effective_policy(kernel)

    return bp


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    return [blueprint(kernel)]


@hookimpl
def risoluto_app_services(kernel: Any) -> list[Any]:
    return [SandboxService(kernel)]


@hookimpl
def risoluto_sandbox_launcher(kernel: Any) -> Any:
    # what `doctor --probe` launches its canary with: the same path as POST /api/v1/sandboxes
    return functools.partial(launch, kernel)
