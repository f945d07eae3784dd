"""Docker SDK plumbing shared by the runtime and the doctor checks (not a plugin itself).

Only the SDK's low-level ``APIClient`` is used: no docker CLI, and no call that could pull an
image (``create_container`` never pulls; the high-level ``containers.run`` would).
"""

from __future__ import annotations

import io
import posixpath
import struct
import tarfile
import threading
import time
from typing import Any, Mapping

import docker
import requests

from ... import docker_transport
from ...errors import ApiError
from ...hookspecs.sandbox import ContainerSpec, Mount
from ._naming import LABEL_SCOPE, SCOPE_ATTEMPT

API_TIMEOUT_S = 60.0
FACTS_TTL_S = 5.0
FACTS_TIMEOUT_S = 3.0
START_HINT = (
    "Start Docker (for example `systemctl start docker`; on a test machine `scripts/provision-docker`) "
    "or point DOCKER_HOST at a running engine, then retry."
)


def docker_host(environ: Mapping[str, str]) -> str:
    return environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def connect(environ: Mapping[str, str], timeout: float = API_TIMEOUT_S, pool: int = 10) -> docker.APIClient:
    """A connected client, or 503 ``sandbox_runtime_unavailable`` with what to do.

    ``timeout`` bounds each socket operation of every call but the long ones that pass their
    own (a container's ``wait``, a log follower): a frozen engine frees the caller's thread."""
    try:
        client = docker_transport.from_env(environ, timeout, pool).api
        client.ping()
        return client
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise unavailable(environ, exc) from None


_FRAME = struct.Struct(">BxxxL")  # the engine's log multiplexing: stream, 3 zero bytes, payload size


def log_tail(client: docker.APIClient, cid: str, lines: int, cap: int) -> tuple[bytes, bool]:
    """The container's last ``lines`` log lines, at most ``cap`` bytes of them, and whether
    any were cut (our containers have no TTY, so the answer is multiplexed).

    Read in 64 KiB blocks, keeping at most ``2 * cap`` bytes: the engine splits long lines into
    16 KiB entries, so a 10 000-line tail can be 160 MB, which the SDK's ``logs()`` holds in
    memory at once; its ``stream=True`` reads frame by frame and took 57 s for 12 MB here (this
    loop: 0.1 s)."""
    url = f"{client.base_url}/v{client.api_version}/containers/{cid}/logs"
    res = client.get(url, params={"stdout": 1, "stderr": 1, "tail": lines}, stream=True, timeout=client.timeout)
    try:
        try:
            res.raise_for_status()
        except requests.exceptions.HTTPError as exc:
            raise docker.errors.create_api_error_from_http_exception(exc) from None
        pending, kept, cut = bytearray(), bytearray(), False
        for block in res.iter_content(1 << 16):  # read to the end: the connection goes back to the pool
            pending += block
            while len(pending) >= _FRAME.size:
                end = _FRAME.size + _FRAME.unpack_from(pending)[1]
                if len(pending) < end:
                    break
                kept += pending[_FRAME.size:end]
                del pending[:end]
            if len(kept) > 2 * cap:
                del kept[:-cap]
                cut = True
    finally:
        res.close()
    if len(kept) > cap:
        del kept[:-cap]
        cut = True
    return bytes(kept), cut


def follow_logs(client: docker.APIClient, cid: str) -> Any:
    """The SDK's ``logs(stream=True, follow=True)`` without a read timeout: the client's
    timeout (the engine deadline) would end a follower whenever its container is quiet that
    long. The stream is closed by the reader (which shuts the socket) or ends with the container.
    Built from the SDK's own helpers (private, like the URL ``log_tail`` reads), the same way
    its ``logs()`` builds it for a container without a TTY, as ours are."""
    url = client._url("/containers/{0}/logs", cid)
    res = client._get(url, params={"stdout": 1, "stderr": 1, "follow": 1, "tail": "all"}, stream=True,
                      timeout=None)
    client._raise_for_status(res)
    return docker.types.CancellableStream(client._multiplexed_response_stream_helper(res), res)


def unavailable(environ: Mapping[str, str], exc: BaseException | None = None) -> ApiError:
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return ApiError(
        503, "sandbox_runtime_unavailable",
        f"The Docker engine is not reachable at {docker_host(environ)}{why}. {START_HINT}",
    )


def not_answering(environ: Mapping[str, str], why: str) -> ApiError:
    """503 for an engine that accepts connections but does not answer in time (frozen, or
    overloaded): the request is not held longer than ``sandbox.engineTimeoutSeconds``."""
    return ApiError(
        503, "sandbox_runtime_unavailable",
        f"The Docker engine at {docker_host(environ)} is not answering ({why}); retry later. If it stays "
        "so, check dockerd (`systemctl status docker`, its log, a full disk under its data root).",
        {"Retry-After": "5"},
    )


def engine_elsewhere(kernel: Any, item: str) -> list[Any] | None:
    """For an engine-bound doctor item: its result when this kernel has no engine of its own.

    A control plane (``sandbox.runtime`` other than docker) has none; the data plane's own
    doctor answers for its engine, shown as "data plane: ..." items.
    """
    from ...hookspecs.doctor import PASS, CheckResult

    runtime = kernel.settings.sandbox.runtime
    if runtime == "docker":
        return None
    return [CheckResult(item=item, status=PASS, reason=f"checked by the {runtime} runtime's engine")]


_FACTS_LOCK = threading.Lock()


def facts_timeout(kernel: Any) -> float:
    """Each socket operation of a doctor's engine call: 3 s, or less with a shorter engine deadline."""
    return min(FACTS_TIMEOUT_S, kernel.settings.sandbox.engine_timeout_seconds)


def engine_facts(kernel: Any) -> dict[str, Any]:
    """Reachability and registered runtimes, for the doctor; cached a few seconds per kernel.

    One fetch at a time (the doctor's items all ask, and so may concurrent hardening requests):
    on a frozen engine the others wait for its answer, not for a fetch each."""
    cached = kernel.state.get("sandbox.engine_facts")
    if cached and time.monotonic() - cached["at"] < FACTS_TTL_S:
        return cached
    with _FACTS_LOCK:
        cached = kernel.state.get("sandbox.engine_facts")
        if cached and time.monotonic() - cached["at"] < FACTS_TTL_S:
            return cached
        return _fetch_facts(kernel)


def _fetch_facts(kernel: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {"at": time.monotonic(), "ok": False, "error": "", "runtimes": {}, "networks": {}}
    try:
        client = docker_transport.from_env(kernel.environ, timeout=facts_timeout(kernel)).api
        try:
            info = client.info()
            facts.update(ok=True, runtimes=info.get("Runtimes") or {}, version=info.get("ServerVersion", ""))
            facts["networks"] = {n["Name"]: n for n in client.networks()}
        finally:
            client.close()
    except Exception as exc:  # the doctor reports, never raises
        facts["error"] = f"not reachable at {docker_host(kernel.environ)} ({type(exc).__name__})"
    facts["at"] = time.monotonic()  # cached from the answer: a slow failure is not fetched again at once
    kernel.state["sandbox.engine_facts"] = facts
    return facts


def runtime_is_gvisor(entry: Mapping[str, Any]) -> bool:
    return "runsc" in posixpath.basename(str(entry.get("path", "")))


def seccomp_filters_enforced(entry: Mapping[str, Any]) -> bool:
    """runsc ignores the OCI seccomp profile unless it runs with ``--oci-seccomp``."""
    if not runtime_is_gvisor(entry):
        return True
    args = entry.get("runtimeArgs") or []
    return any(a in ("--oci-seccomp", "--oci-seccomp=true") for a in args)


def _mount(m: Mount) -> dict[str, Any]:
    out: dict[str, Any] = {"Type": m.type, "Target": m.target, "ReadOnly": m.read_only}
    if m.type == "bind":
        out["Source"] = m.source
        out["BindOptions"] = {"Propagation": "rprivate"}
    elif m.type == "volume":
        if m.source:  # empty: an anonymous volume, created with the container, removed with it
            out["Source"] = m.source
        # a per-attempt volume starts empty: nothing is copied up from the image
        out["VolumeOptions"] = {"NoCopy": m.labels.get(LABEL_SCOPE) == SCOPE_ATTEMPT, "Labels": dict(m.labels)}
    elif m.type == "tmpfs":
        out["TmpfsOptions"] = {"SizeBytes": m.tmpfs_size, "Mode": 0o1777}
    return out


def create_kwargs(spec: ContainerSpec, labels: Mapping[str, str]) -> dict[str, Any]:
    """The arguments of ``APIClient.create_container`` for a final spec."""
    host_config: dict[str, Any] = {
        "CapDrop": list(spec.cap_drop) or None,
        "CapAdd": list(spec.cap_add) or None,
        "SecurityOpt": list(spec.security_opt) or None,
        "ReadonlyRootfs": spec.read_only_rootfs,
        "Mounts": [_mount(m) for m in spec.mounts],
        "NetworkMode": spec.network or "default",
        "Init": False,
        **spec.host_config,
    }
    if spec.runtime:
        host_config["Runtime"] = spec.runtime
    return {
        "image": spec.image,
        "command": list(spec.command) or None,
        "user": spec.user or None,
        "environment": [f"{k}={v}" for k, v in spec.env.items()],
        "labels": dict(labels),
        "working_dir": spec.working_dir or None,
        "host_config": host_config,
        "name": spec.name,
        "detach": True,
    }


def put_groups(spec: ContainerSpec) -> dict[str, dict[str, bytes]]:
    """Files grouped by where they are put: the shallowest writable mount that holds them
    (so directories below it can be created with the container user as owner), else ``/``."""
    targets = sorted(
        (m.target.rstrip("/") for m in spec.mounts if m.type in ("volume", "bind") and not m.read_only),
        key=len,
    )
    groups: dict[str, dict[str, bytes]] = {}
    for path, data in spec.files.items():
        root = next((t for t in targets if path.startswith(t + "/")), "/")
        groups.setdefault(root, {})[path] = data
    return groups


def build_archive(root: str, files: Mapping[str, bytes], uid: int, gid: int) -> bytes:
    """A tar of ``files`` relative to ``root``; a path ending in ``/`` is a directory.

    Directories are 0700 and files 0600, owned by the container user: ``auth.json`` is a
    credential and only the agent may read it.
    """
    buf = io.BytesIO()
    now = time.time()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            rel = posixpath.relpath(path.rstrip("/"), root)
            if rel.startswith(".."):
                raise ValueError(f"{path} is not below {root}")
            parts = rel.split("/")
            is_dir = path.endswith("/")
            for depth in range(1, len(parts) + (1 if is_dir else 0)):
                name = "/".join(parts[:depth])
                if name not in seen:
                    seen.add(name)
                    tar.addfile(_info(name, tarfile.DIRTYPE, 0o700, uid, gid, now))
            if not is_dir:
                data = files[path]
                info = _info(rel, tarfile.REGTYPE, 0o600, uid, gid, now)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _info(name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    return info


def parse_user(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    return (int(uid), int(gid or uid)) if uid.isdigit() and (gid or uid).isdigit() else (0, 0)
