"""Doctor items of the control plane with ``sandbox.runtime: remote`` (not a plugin itself;
``remote_runtime`` calls :func:`checks`): it has no Docker access, it reaches its data plane with
the secret, and the data plane's own items (prefixed ``data plane: ``)."""

from __future__ import annotations

import os
import stat
from typing import Any, Mapping

import anyio
import httpx

from ...errors import ApiError
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from ._guard import DOCKER_SOCKETS
from ...roles import SECRET_ENV
from ._wire import PREFIX
from ._remote import RemoteRuntime

def docker_access(environ: Mapping[str, str]) -> list[str]:
    """Ways this process could reach a Docker engine (empty: none found)."""
    found = [f"DOCKER_HOST is set ({environ['DOCKER_HOST'][:80]})"] if environ.get("DOCKER_HOST", "").strip() else []
    for path in DOCKER_SOCKETS:  # the directories in that list are no sockets: skipped
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            continue
        if is_socket and os.access(path, os.R_OK | os.W_OK):
            found.append(f"this process can open {path}")
    return found


def _doctor_secret(kernel: Any) -> str:
    secret = (kernel.environ.get(SECRET_ENV) or "").strip()
    if not secret and kernel.backends.secrets.store is not None:
        try:  # inside GET /api/v1/hardening the checks run in a worker thread of the event loop
            secret = (anyio.from_thread.run(kernel.backends.secrets.store.get, SECRET_ENV) or "").strip()
        except Exception:
            secret = ""
    return secret


def _remote_items(kernel: Any) -> list[CheckResult]:
    """Reachability and authentication of the data plane, then the data plane's own items."""
    runtime = RemoteRuntime(kernel.settings, kernel.environ)
    try:
        base = runtime.base_url()
    except ApiError as err:
        return [CheckResult(item=ITEM_LINK, status=FAIL, reason=err.message, fix="set sandbox.dataPlaneUrl")]
    secret = _doctor_secret(kernel)
    if not secret:
        return [CheckResult(item=ITEM_LINK, status=FAIL, reason=f"{SECRET_ENV} is not set here",
                            fix=f"set {SECRET_ENV} (environment or secret store) to the data plane's secret")]
    headers = {"Authorization": f"Bearer {secret}"}
    limit = min(kernel.settings.sandbox.data_plane_timeout_s, 5.0)
    try:
        with httpx.Client(trust_env=False, timeout=limit, headers=headers) as client:
            ping = client.get(base + PREFIX + "/ping")
            RemoteRuntime.parse_answer(ping, base, ())
            hardening = client.get(base + PREFIX + "/hardening", timeout=max(limit, 30.0))
            items = RemoteRuntime.parse_answer(hardening, base, ()).get("items") or []
    except ApiError as err:
        return [CheckResult(item=ITEM_LINK, status=FAIL, reason=err.message, fix="start the data plane; same secret")]
    except httpx.HTTPError as exc:
        return [CheckResult(item=ITEM_LINK, status=FAIL, reason=f"data plane at {base} not reachable "
                            f"({type(exc).__name__})", fix="start `risoluto serve --data-plane`; check the URL")]
    out = [CheckResult(item=ITEM_LINK, status=PASS, reason=f"data plane at {base} answers and accepts the secret "
                       f"(instance {ping.json().get('instance', '?')})")]
    for item in items:
        if isinstance(item, dict) and item.get("status") in (PASS, WARN, FAIL):
            out.append(CheckResult(item=f"data plane: {item.get('item', '?')}", status=item["status"],
                                   reason=str(item.get("reason", "")), fix=str(item.get("fix", ""))))
    return out


ITEM_LINK = "sandbox data plane"
ITEM_DOCKER = "control plane docker access"


def checks(kernel: Any) -> list[CheckResult]:
    settings = kernel.settings
    if settings.sandbox.runtime != "remote" or settings.sandbox.role == "data-plane":
        return []
    access = docker_access(kernel.environ)
    out = [CheckResult(
        item=ITEM_DOCKER, status=FAIL if access else PASS,
        reason="; ".join(access) + ": the API process could drive Docker itself, the split gains nothing" if access
        else "no Docker socket is accessible and DOCKER_HOST is unset: only the data plane drives Docker",
        fix="run the control plane as a user outside the docker group, without the socket mounted, DOCKER_HOST "
            "unset" if access else "")]
    if settings.codex.sandbox.egress_allowlist:
        out.append(CheckResult(item="sandbox egress (remote)", status=FAIL,
                               reason="egressAllowlist needs per-sandbox steps on the Docker host; with "
                                      "sandbox.runtime: remote every launch is refused",
                               fix="empty codex.sandbox.egressAllowlist or use sandbox.runtime: docker"))
    return out + _remote_items(kernel)
