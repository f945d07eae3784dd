"""From a launch request to a running sandbox: validate, resolve secrets, build the spec
(the ``risoluto_sandbox_spec`` edits, the egress attach, the ``risoluto_sandbox_spec_check``
checks), hand it to the runtime.

Used by the HTTP API and the CLI (not a plugin itself).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from ...errors import ApiError
from ...hookspecs.egress import EGRESS_LABEL
from ...hookspecs.sandbox import ContainerSpec, LaunchRequest
from ...settings import MAX_TIMEOUT_S
from ...text import is_text
from ._guard import MIN_MATCHED_VALUE
from ._naming import LABEL_ISSUE, LABEL_POLICY, container_name, issue_key, valid_image_ref, validate_issue
from ._workspaces import launch_scope

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,256}\Z")
_FIELDS = {"issue", "command", "image", "env", "secrets", "timeout_s", "wait"}
_RESERVED_ENV = {"HOME", "CODEX_HOME"}


def bad(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


def parse_launch(data: dict[str, Any]) -> tuple[LaunchRequest, bool]:
    """The JSON body of ``POST /api/v1/sandboxes`` -> (request, wait); 400 on anything odd."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise bad(f"unknown field(s): {', '.join(unknown)}.")
    issue = validate_issue(data.get("issue"))
    command = data.get("command", [])
    if not isinstance(command, list) or len(command) > 1000 or not all(
        isinstance(a, str) and "\x00" not in a and len(a) <= 65536 and is_text(a) for a in command
    ):
        raise bad("command must be a list of at most 1000 strings (argv; no shell is added).")
    image = data.get("image", "")
    if not isinstance(image, str) or (image and not valid_image_ref(image)):
        raise bad("image must be an image reference such as risoluto-codex:latest.", "invalid_image")
    env = data.get("env", {})
    if not isinstance(env, dict) or len(env) > 256:
        raise bad("env must be an object of at most 256 NAME: value strings.")
    for key, value in env.items():
        if not _ENV_KEY.match(key) or key in _RESERVED_ENV:
            raise bad(f"env name {key[:64]!r} is not allowed (letters, digits, _; not HOME or CODEX_HOME).")
        if not isinstance(value, str) or "\x00" in value or len(value) > 32768 or not is_text(value):
            raise bad(f"env value of {key} must be a string without NUL, at most 32 KiB.")
    secrets = data.get("secrets", [])
    if not isinstance(secrets, list) or not all(isinstance(s, str) and _SECRET_NAME.match(s) for s in secrets):
        raise bad("secrets must be a list of secret names ([A-Za-z0-9_.:-]{1,256}).")
    if len(set(secrets)) != len(secrets) or set(secrets) & (set(env) | _RESERVED_ENV):
        raise bad("a secret is named twice, or also given in env.")
    timeout = data.get("timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise bad(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}].")
    wait = data.get("wait", False)
    if not isinstance(wait, bool):
        raise bad("wait must be true or false.")
    request = LaunchRequest(issue=issue, command=tuple(command), image=image, env=dict(env),
                            secrets=tuple(secrets), timeout_s=float(timeout) if timeout is not None else None)
    return request, wait


async def resolve_secrets(kernel: Any, names: tuple[str, ...]) -> dict[str, str]:
    if not names:
        return {}
    secrets = kernel.backends.secrets
    store = secrets.store
    if store is None:
        raise ApiError(503, "secrets_locked", f"The secret store is locked: {secrets.locked_reason}.")
    values: dict[str, str] = {}
    for name in names:
        value = await store.get(name)
        if value is None:
            raise ApiError(400, "secret_not_found", f"No secret named {name!r}.")
        values[name] = value
    return values


def policy_digest(policy: dict[str, Any]) -> str:
    canonical = json.dumps(policy, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def build_spec(kernel: Any, request: LaunchRequest, secret_values: dict[str, str]) -> ContainerSpec:
    settings = kernel.settings
    key = "preview" if request.dry_run else issue_key(request.issue)
    spec = ContainerSpec(name=container_name(key), image=request.image or settings.codex.sandbox.image,
                         command=list(request.command))
    spec.env.update(request.env)
    # a brokered secret never enters the worker: the egress broker gives it a placeholder instead
    brokered = {c.secret for c in settings.egress.credentials}
    spec.env.update({name: value for name, value in secret_values.items() if name not in brokered})
    spec.labels[LABEL_ISSUE] = request.issue
    kernel.hooks.sandbox_spec(spec, request, settings)
    attach_egress(kernel, spec, request)
    kernel.hooks.sandbox_spec_check(spec, request, settings)
    spec.policy["network"] = spec.network  # the final one: a third party's edit stands
    spec.policy["mounts"] = sorted(
        ({"target": m.target, "type": m.type, "readOnly": m.read_only} for m in spec.mounts),
        key=lambda m: m["target"],
    )
    _no_secret_outside_env(spec, secret_values)
    _no_brokered_value(spec, {name: secret_values[name] for name in brokered & set(secret_values)})
    spec.labels[LABEL_POLICY] = policy_digest(spec.policy)
    return spec


def attach_egress(kernel: Any, spec: ContainerSpec, request: LaunchRequest) -> None:
    """Under an allowlist the running enforcer takes the spec over (network, proxy environment,
    lifecycle callbacks) after every edit, so no edit can route around it; without a running
    enforcer the check phase refuses the spec (``egress.allowlist``)."""
    enforcer = kernel.backends.egress
    if enforcer is not None and kernel.settings.codex.sandbox.egress_allowlist:
        enforcer.attach(spec, request, kernel.settings)
        spec.labels[EGRESS_LABEL] = enforcer.name


def _no_secret_outside_env(spec: ContainerSpec, secret_values: dict[str, str]) -> None:
    """Secrets travel only as environment entries: never in argv, labels or the name."""
    visible = [spec.name, *spec.command, *spec.labels.values(), *spec.labels.keys()]
    for name, value in secret_values.items():
        if len(value) >= MIN_MATCHED_VALUE and any(value in text for text in visible):
            raise ApiError(400, "secret_exposed", f"the value of secret {name!r} appears in the command line "
                           "or a label; secrets are passed only as environment entries.")


def _no_brokered_value(spec: ContainerSpec, values: dict[str, str]) -> None:
    """Fail closed: a brokered secret's value is nowhere in the spec (environment, files, argv, labels)."""
    texts = [*spec.env.values(), *spec.command, *spec.labels.values()]
    blobs = list(spec.files.values())
    for name, value in values.items():
        if len(value) >= MIN_MATCHED_VALUE and (any(value in t for t in texts)
                                                or any(value.encode() in b for b in blobs)):
            raise ApiError(400, "secret_exposed", f"the value of brokered secret {name!r} would reach the worker; "
                           "the launch is refused.")


def effective_policy(kernel: Any) -> dict[str, Any]:
    """The policy a launch would get now (``GET /api/v1/sandbox/policy``); touches nothing."""
    request = LaunchRequest(issue="preview", dry_run=True)
    try:
        spec = build_spec(kernel, request, {})
    except ApiError as err:
        return {"launchable": False, "error": err.body()["error"]}
    return {"launchable": True, "policy": spec.policy, "policy_digest": spec.labels[LABEL_POLICY]}


async def launch(kernel: Any, request: LaunchRequest, wait: bool = False) -> dict[str, Any]:
    runtime = kernel.backends.runtime
    if runtime is None:
        raise ApiError(503, "sandbox_runtime_unavailable",
                       f"No sandbox runtime {kernel.settings.sandbox.runtime!r} is loaded; check sandbox.runtime "
                       "and that its plugin is enabled, and that Docker is running.")
    secret_values = await resolve_secrets(kernel, request.secrets)
    # from the workspace to the start, one launch of an issue at a time; a refused or failed
    # launch takes back the workspace directory it made (never one it found)
    async with launch_scope(kernel.state, issue_key(request.issue)):
        spec = build_spec(kernel, request, secret_values)
        timeout = request.timeout_s or kernel.settings.codex.sandbox.timeout_s
        record = await runtime.launch(spec, timeout)
    if wait:
        record = await runtime.wait(record["id"])
    return {**record, "policy": spec.policy}
