"""The data-plane role (docs/data-plane.md): ``risoluto serve --data-plane``.

A data plane is the same kernel app with a role. It holds the Docker socket and serves only
the sandbox runtime operations under ``/dp/v1/`` (routes in ``_dp_routes``) to its control
plane; the control plane serves the public API and needs no Docker access.

- Plugins: only :data:`KEEP` of the default plugins load (client address, rate limit,
  metrics, the docker runtime, the image check and this one). The secrets API and store,
  webhooks, the write/read guards and the sandbox API are not loaded; the kernel's own
  routes (overlay, hardening, runtime, openapi) exist but answer 404 (see the guard).
- Bind: an IP address of a private network (10/8, 172.16/12, 192.168/16, fc00::/7), e.g. the
  gateway of ``risoluto-internal`` (``RISOLUTO_BIND=docker:risoluto-internal``); never
  loopback, 0.0.0.0/:: or a public address.
- Auth: ``Authorization: Bearer <RISOLUTO_DATA_PLANE_SECRET>`` on every request, any
  method, any path, compared in constant time; 401 ``data_plane_unauthorized`` otherwise.
- Rate limits: ``/dp/`` counts in the ``api`` bucket (``rateLimit.api``). Writes that pass
  are audited in ``<DATA_DIR>/write-audit.log`` with principal ``data-plane``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from datetime import datetime, timezone
from typing import Any, Mapping

import attrs

from ... import docker_transport
from ...errors import ApiError, StartupError
from ...fsutil import append_line
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult
from ...hookspecs.ratelimit import RateRule
from ._dp_routes import STATE, DataPlaneService, blueprint
from ._wire import PREFIX, SECRET_ENV, header_safe

log = logging.getLogger("risoluto.data_plane")
ROLE = "data-plane"
NAME = "sandbox.data_plane"
KEEP = frozenset({"http.client_address", "http.rate_limit", "http.metrics", "sandbox.docker_runtime",
                  "sandbox.image_check", NAME})
PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
MIN_SECRET = 32
MIN_BODY = 16 * 1024 * 1024  # a spec carries files (auth.json) and env: more than the public 1 MiB
_SERVED = (PREFIX + "/", "/metrics")
_HINT = ("set RISOLUTO_BIND to an address of the private worker network: the gateway of risoluto-internal "
         "(RISOLUTO_BIND=docker:risoluto-internal) or another address in 10/8, 172.16/12, 192.168/16 or fc00::/7")


# --- starting the role (called by ``risoluto serve --data-plane``) ---------------------------
def data_plane_settings(settings: Any, environ: Mapping[str, str]) -> Any:
    """The settings of a data plane: role, plugin set, body limit; StartupError when unsafe."""
    from ...manager import default_plugin_names

    sandbox = settings.sandbox
    if sandbox.runtime != "docker":
        raise StartupError("a data plane runs sandboxes itself: sandbox.runtime must be docker, "
                           f"not {sandbox.runtime!r}")
    if set(settings.plugins.disable) & {NAME, "sandbox.docker_runtime"}:
        raise StartupError("plugins.disable names sandbox.data_plane or sandbox.docker_runtime, "
                           "which a data plane needs")
    check_secret(environ)
    bind = resolve_bind(settings.server.bind, environ)
    disable = sorted(set(settings.plugins.disable) | (set(default_plugin_names()) - KEEP))
    server = attrs.evolve(settings.server, bind=bind, max_body_bytes=max(settings.server.max_body_bytes, MIN_BODY))
    return attrs.evolve(settings, server=server, sandbox=attrs.evolve(sandbox, role=ROLE),
                        plugins=attrs.evolve(settings.plugins, disable=disable))


def check_secret(environ: Mapping[str, str]) -> str:
    secret = (environ.get(SECRET_ENV) or "").strip()
    if len(secret) < MIN_SECRET or not header_safe(secret):
        what = "is not set" if not secret else f"is shorter than {MIN_SECRET} characters" \
            if len(secret) < MIN_SECRET else "has characters other than printable ASCII"
        raise StartupError(f"refusing to start the data plane: {SECRET_ENV} {what}; set it to the same random "
                           f"value (32+ characters, e.g. `openssl rand -hex 32`) on both planes")
    return secret


def resolve_bind(bind: str, environ: Mapping[str, str]) -> str:
    """The address to listen on; ``docker:<network>`` means that Docker network's gateway."""
    if bind.startswith("docker:"):
        bind = network_gateway(bind.split(":", 1)[1], environ)
    try:
        ip = ipaddress.ip_address(bind.split("%", 1)[0])
    except ValueError:
        raise StartupError(f"refusing to bind the data plane to {bind!r}: not an IP address; {_HINT}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        why = "every interface (0.0.0.0 / ::)"
    elif ip.is_loopback:
        why = "loopback (every local process, and nothing the control plane's container can reach)"
    elif not any(ip.version == net.version and ip in net for net in PRIVATE_NETS):
        why = "an address outside the private ranges"
    else:
        return str(ip)
    raise StartupError(f"refusing to bind the data plane to {bind}: {why}; {_HINT}")


def network_gateway(name: str, environ: Mapping[str, str]) -> str:
    import docker

    try:
        client = docker_transport.from_env(environ, timeout=5).api
        try:
            configs = (client.inspect_network(name).get("IPAM") or {}).get("Config") or []
        finally:
            client.close()
    except docker.errors.NotFound:
        raise StartupError(f"RISOLUTO_BIND=docker:{name}: no Docker network {name!r}; create it "
                           f"(docker network create {name}) or name an address") from None
    except Exception as exc:
        raise StartupError(f"RISOLUTO_BIND=docker:{name}: Docker is not reachable ({type(exc).__name__})") from None
    for conf in configs:
        if conf.get("Gateway"):
            return str(conf["Gateway"])
    raise StartupError(f"RISOLUTO_BIND=docker:{name}: the network has no gateway address")


# --- the guard: every request needs the secret ------------------------------------------
def _bearer(headers: Any) -> bytes | None:
    values = headers.getlist("Authorization")
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:  # ASGI header values are latin-1 decoded: this gives the sent bytes back
        return token.strip().encode("latin-1")
    except UnicodeEncodeError:
        return token.strip().encode("utf-8", "surrogatepass")


def secret_matches(given: bytes | None, digest: bytes | None) -> bool:
    """Constant-time over bytes (both sides hashed: no length leak); never raises."""
    if not given or not digest:
        return False
    return hmac.compare_digest(hashlib.sha256(given).digest(), digest)


@hookimpl(tryfirst=True)
def risoluto_request_authorize(kernel: Any, info: Any, settings: Any) -> ApiError | None:
    if settings.sandbox.role != ROLE:
        return None
    state = kernel.state.get(STATE)
    if state is None:  # the app was created as a control plane: the role cannot change later
        return None
    if not secret_matches(_bearer(info.headers), state.digest):
        return ApiError(401, "data_plane_unauthorized", f"A data plane needs Authorization: Bearer <{SECRET_ENV}>.",
                        {"WWW-Authenticate": 'Bearer realm="risoluto-data-plane"'})
    if info.route is not None and not info.route.startswith(_SERVED):
        return ApiError(404, "not_found", f"A data plane serves only {PREFIX}/ (and /metrics).")
    info.principal = ROLE
    info.admitted = True
    return None


@hookimpl
def risoluto_request_completed(kernel: Any, info: Any, status: int) -> None:
    """The write audit of the data plane (the write guard is not loaded here)."""
    if kernel.settings.sandbox.role != ROLE or not info.admitted or not info.mutating:
        return
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
             "method": info.method, "path": info.path, "status": status, "remote": info.client,
             "principal": ROLE, "request_id": info.request_id}
    try:
        append_line(kernel.settings.data_path / "write-audit.log", json.dumps(entry, ensure_ascii=True))
    except OSError as exc:  # the response is decided; never a 500
        log.error("cannot append to write-audit.log (%s): the entry for %s %s (request %s) is lost",
                  exc.strerror or exc, info.method, info.path, info.request_id)
    except Exception:
        log.exception("cannot append to the write audit log")


# --- wiring --------------------------------------------------------------------------------
@hookimpl
def risoluto_ratelimit_rules(settings: Any) -> list[RateRule]:
    if settings.sandbox.role != ROLE:
        return []
    api = settings.rate_limit.api
    return [RateRule(bucket="api", limit=api.limit, window_seconds=api.window_seconds, prefixes=("/dp/",))]


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    if kernel.settings.sandbox.role != ROLE:
        return []
    from ._dp_routes import DataPlaneState

    secret = (kernel.environ.get(SECRET_ENV) or "").strip()
    ok = len(secret) >= MIN_SECRET and header_safe(secret)
    digest = hashlib.sha256(secret.encode("ascii")).digest() if ok else None
    kernel.state[STATE] = DataPlaneState(digest=digest)
    return [blueprint(kernel)]


@hookimpl
def risoluto_app_services(kernel: Any) -> list[Any]:
    return [DataPlaneService(kernel, KEEP)] if STATE in kernel.state else []


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    settings = kernel.settings
    if settings.sandbox.role != ROLE:
        return []
    out = []
    try:
        check_secret(kernel.environ)
        out.append(CheckResult(item="data plane secret", status=PASS,
                               reason=f"{SECRET_ENV} is set; every request needs it (constant-time compare)"))
    except StartupError as exc:
        out.append(CheckResult(item="data plane secret", status=FAIL, reason=str(exc), fix=f"set {SECRET_ENV}"))
    try:
        bind = resolve_bind(settings.server.bind, kernel.environ)
        out.append(CheckResult(item="data plane bind", status=PASS, reason=f"listens on {bind} (a private network)"))
    except StartupError as exc:
        out.append(CheckResult(item="data plane bind", status=FAIL, reason=str(exc), fix=_HINT))
    loaded = sorted({p.name for p in kernel.plugins if p.source == "default"} - KEEP)
    out.append(CheckResult(
        item="data plane plugins", status=FAIL if loaded else PASS,
        reason=f"plugins a data plane must not load: {', '.join(loaded)}" if loaded else
        "no secrets API, webhooks, overlay or public sandbox API; only /dp/v1/ is served",
        fix="start it with `risoluto serve --data-plane`" if loaded else ""))
    return out


@hookimpl
def risoluto_checklist_provides(kernel: Any) -> list[str]:
    # a data plane's secret guards every request (reads and writes), and its received specs go
    # through the same policy guard as on the control plane (``_dp_routes.enforce``)
    return ["write guard", "read guard", "sandbox policy check"] if kernel.settings.sandbox.role == ROLE else []
