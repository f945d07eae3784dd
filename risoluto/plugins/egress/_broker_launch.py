"""What a launch gets when credential brokering is on: placeholders, a trust bundle, a CA.

Per launch (called from the egress enforcer's ``attach``):

- each brokered secret named in ``secrets`` becomes an environment entry holding that sandbox's
  placeholder (the launcher never puts a brokered value into the environment);
- ``CODEX_HOME/auth.json``: when its ``OPENAI_API_KEY`` is brokered, the worker's copy holds the
  placeholder instead (Codex's own requests get the real key at the proxy);
- a CA of its own (``_sandbox_ca``); the worker trusts it *in addition to* the image's roots
  through a combined bundle (the image's own bundle, read from the created container, + the CA)
  at ``/etc/risoluto-ca/bundle.pem``, named by ``SSL_CERT_FILE``, ``CURL_CA_BUNDLE``,
  ``REQUESTS_CA_BUNDLE`` and ``GIT_SSL_CAINFO``; ``NODE_EXTRA_CA_CERTS`` names the CA alone
  (Node adds it to its own roots).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from typing import Any

import anyio

from risoluto.doctor import PROBE_ISSUE
from risoluto.hookspecs.sandbox import ContainerSpec, LaunchRequest, Mount
from risoluto.plugins.sandbox._naming import CODEX_HOME, LABEL_SCOPE, SCOPE_ATTEMPT
from risoluto.settings import Settings

from ._broker import Broker

log = logging.getLogger("risoluto.egress")

CA_DIR = "/etc/risoluto-ca"
BUNDLE = CA_DIR + "/bundle.pem"
CA_FILE = CA_DIR + "/sandbox-ca.pem"
AUTH_JSON = CODEX_HOME + "/auth.json"
AUTH_KEY = "OPENAI_API_KEY"
# Where images keep their system bundle: Debian/Ubuntu/Alpine, RHEL/Fedora, Alpine/BSD, SUSE.
IMAGE_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem",
                 "/etc/ssl/ca-bundle.pem")
MAX_BUNDLE = 4 * 1024 * 1024
TRUST_ENV = ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "GIT_SSL_CAINFO")


def attach_broker(broker: Broker, spec: ContainerSpec, request: LaunchRequest, settings: Settings,
                  sandbox: str, docker: Any) -> None:
    brokered = broker.brokered()
    # the doctor's canary gets every placeholder, so that its probe can prove them from inside
    named = brokered if request.issue == PROBE_ISSUE else set(request.secrets) & brokered
    names = set(named)
    auth = _auth_key_brokered(spec, brokered)
    if auth:
        names.add(AUTH_KEY)
    life = (request.timeout_s or settings.codex.sandbox.timeout_s) + settings.codex.sandbox.stop_grace_s + 60
    state = broker.prepare(sandbox, names, life)
    for name in named:
        spec.env[name] = state.placeholders[name]
    if auth:
        data = json.loads(spec.files[AUTH_JSON])
        data[AUTH_KEY] = state.placeholders[AUTH_KEY]
        spec.files[AUTH_JSON] = json.dumps(data, indent=2).encode()
    spec.mounts.append(Mount(target=CA_DIR, source="", type="volume", labels={LABEL_SCOPE: SCOPE_ATTEMPT}))
    spec.files[CA_DIR + "/"] = b""
    spec.files[CA_FILE] = state.ca.pem
    spec.files[BUNDLE] = state.ca.pem  # replaced by image bundle + CA once the container exists
    for name in TRUST_ENV:
        spec.env[name] = BUNDLE
    spec.env["NODE_EXTRA_CA_CERTS"] = CA_FILE
    spec.policy["brokeredSecrets"] = sorted(names)

    async def created(container_id: str) -> None:
        image_roots = await anyio.to_thread.run_sync(image_bundle, docker, container_id)
        if not image_roots:
            log.warning("egress broker: no CA bundle found in image %s; the sandbox trusts only its own CA",
                        spec.image)
        spec.files[BUNDLE] = image_roots.rstrip(b"\n") + b"\n" + state.ca.pem if image_roots else state.ca.pem
        broker.register(state)

    async def removed(container_id: str) -> None:
        broker.unregister(sandbox)

    spec.on_created.append(created)
    spec.on_removed.append(removed)


def _auth_key_brokered(spec: ContainerSpec, brokered: frozenset[str]) -> bool:
    raw = spec.files.get(AUTH_JSON)
    if raw is None or AUTH_KEY not in brokered:
        return False
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get(AUTH_KEY), str) and bool(data[AUTH_KEY])


def image_bundle(docker: Any, container_id: str) -> bytes:
    """The image's own CA bundle, read from the created (not yet started) container; b"" if none."""
    for path in IMAGE_BUNDLES:
        for _ in range(4):  # follow a few symlinks (/etc/ssl/cert.pem -> certs/ca-certificates.crt)
            try:
                chunks, stat = docker.api.get_archive(container_id, path)
                data = b"".join(chunks)
            except Exception:  # noqa: BLE001 - absent in this image: try the next place
                break
            target = stat.get("linkTarget") or ""
            member = _first_member(data)
            if member is not None and member[0].issym():
                path = posixpath.normpath(posixpath.join(posixpath.dirname(path), member[0].linkname))
                continue
            if target and target != path and member is None:
                path = target
                continue
            if member is not None and member[1] and len(member[1]) <= MAX_BUNDLE:
                return member[1]
            break
    return b""


def _first_member(data: bytes) -> tuple[tarfile.TarInfo, bytes] | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            info = tar.next()
            if info is None:
                return None
            if info.isfile() and info.size <= MAX_BUNDLE:
                fh = tar.extractfile(info)
                return info, fh.read() if fh else b""
            return info, b""
    except tarfile.TarError:
        return None


def make_broker(kernel: Any) -> Broker | None:
    """The proxy's broker when ``egress.credentials`` is set (checked again: startup refuses a bad one)."""
    from risoluto.errors import ConfigError, StartupError

    from ._broker import SecretsLocked, broker_metrics
    from ._credentials import validate

    try:
        credentials = validate(kernel.settings)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    if not credentials:
        return None

    async def read_secret(name: str) -> str | None:
        store = kernel.backends.secrets.store  # read per request: a rotated secret applies at once
        if store is None:
            raise SecretsLocked
        return await store.get(name)

    return Broker(credentials, read_secret, kernel.settings.egress.upstream_ca_file, broker_metrics(kernel))
