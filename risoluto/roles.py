"""Kernel roles (``sandbox.role``): a control plane (the default) or a data plane
(``risoluto serve --data-plane``, docs/data-plane.md).

The data plane is the same kernel with fewer plugins, a private-network bind and a shared secret.
Its settings are made here, before any plugin is loaded (which plugins load is part of the role),
so the CLI needs no plugin module to start one.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

import attrs

from . import docker_transport
from .errors import StartupError

ROLE = "data-plane"
NAME = "data_plane.server"
KEEP = frozenset({"http.client_address", "http.rate_limit", "http.metrics", "sandbox.docker_runtime",
                  "sandbox.image_check", NAME})
PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
MIN_SECRET = 32
MIN_BODY = 16 * 1024 * 1024  # a spec carries files (auth.json) and env: more than the public 1 MiB
SECRET_ENV = "RISOLUTO_DATA_PLANE_SECRET"
HINT = ("set RISOLUTO_BIND to an address of the private worker network: the gateway of risoluto-internal "
         "(RISOLUTO_BIND=docker:risoluto-internal) or another address in 10/8, 172.16/12, 192.168/16 or fc00::/7")


def header_safe(secret: str) -> bool:
    """The shared secret is sent as a header value every client sends the same way:
    printable ASCII, no spaces."""
    return all(33 <= ord(c) <= 126 for c in secret)


def data_plane_settings(settings: Any, environ: Mapping[str, str]) -> Any:
    """The settings of a data plane: role, plugin set, body limit; StartupError when unsafe."""
    from .manager import default_plugin_names

    sandbox = settings.sandbox
    if sandbox.runtime != "docker":
        raise StartupError("a data plane runs sandboxes itself: sandbox.runtime must be docker, "
                           f"not {sandbox.runtime!r}")
    if set(settings.plugins.disable) & {NAME, "sandbox.docker_runtime"}:
        raise StartupError(f"plugins.disable names {NAME} or sandbox.docker_runtime, which a data plane needs")
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
        raise StartupError(f"refusing to bind the data plane to {bind!r}: not an IP address; {HINT}") from None
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
    raise StartupError(f"refusing to bind the data plane to {bind}: {why}; {HINT}")


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
