"""The Docker SDK's transport for a unix-socket engine, made fit for many calls.

Shared by every plugin that talks to the engine (the sandbox runtime, the egress network).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import docker
from docker.transport import UnixHTTPAdapter

log = logging.getLogger("risoluto.docker")


class SocketAdapter(UnixHTTPAdapter):
    """The SDK's unix-socket adapter, with one connection pool for the socket.

    docker-py keys its pools by the full request URL, so every container's own paths
    (``/containers/<id>/start``, ``.../wait``, ...) open a new pool and a new connection, and
    past 25 paths it closes old ones: a launch rarely reused a connection. One socket, one pool.
    """

    def get_connection(self, url: Any, proxies: Any = None) -> Any:
        return super().get_connection(f"http+unix://{self.socket_path}", proxies)


def tuned(client: docker.APIClient) -> docker.APIClient:
    """On a unix socket: one pooled set of connections, and no environment lookups per call.

    ``trust_env`` makes requests scan the environment for proxies and read ``~/.netrc`` on every
    call; neither applies to a unix socket (the adapter never uses a proxy). TCP and SSH engines
    keep the SDK's defaults, where a proxy setting may be wanted. This reaches into the SDK's
    transport: if a future SDK changes it, the client is used as the SDK made it (slower, same
    behaviour) and a warning says so.
    """
    old = getattr(client, "_custom_adapter", None)  # set only for unix, npipe, ssh and TLS
    if old is None or type(old) is not UnixHTTPAdapter:
        return client
    try:
        adapter = SocketAdapter(f"http+unix://{old.socket_path}", timeout=old.timeout,
                                max_pool_size=old.max_pool_size)
    except (AttributeError, TypeError) as exc:
        log.warning("Docker SDK transport not as expected (%s); using it unchanged", type(exc).__name__)
        return client
    client.mount("http+docker://", adapter)  # routes every request of this client
    client._custom_adapter = adapter  # the SDK's fallback in get_adapter(): keep it the same one
    old.close()
    client.trust_env = False
    return client


def from_env(environ: Mapping[str, str], timeout: float, pool: int = 10) -> docker.DockerClient:
    """``docker.from_env()``, tuned before its first request reaches the engine.

    With ``version="auto"`` the SDK asks the engine for its API version while it builds the
    client, before :func:`tuned` can apply: that call went out with ``trust_env`` on, and so
    with Basic credentials from a ``machine localhost`` entry in ``~/.netrc``. Here a tuned
    client with a pinned version asks instead (``/version`` is not versioned), and the client
    is then built with the answer, so it never probes.
    """
    env = dict(environ)
    probe = docker.from_env(environment=env, version=docker.constants.MINIMUM_DOCKER_API_VERSION, timeout=timeout)
    try:
        tuned(probe.api)
        version = probe.api.version(api_version=False).get("ApiVersion")
    finally:
        probe.close()
    if not isinstance(version, str):
        raise docker.errors.DockerException('Invalid response from docker daemon: key "ApiVersion" is missing.')
    client = docker.from_env(environment=env, version=version, timeout=timeout, max_pool_size=pool)
    tuned(client.api)
    return client
