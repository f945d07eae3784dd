"""The final policy check of a ContainerSpec (not a plugin itself; see ``policy_guard``).

Whatever plugins contributed, a spec is refused when it would mount a host path that must
never reach a worker (DATA_DIR, master.key, the Docker socket, ``~/.codex``), when it slips
host settings past the checklist (privileged options, host network, unconfined profiles),
or when an enabled checklist item is not actually in the spec.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlparse

from ...errors import ApiError
from ...hookspecs.sandbox import ContainerSpec
from ...settings import Settings
from ._naming import auth_dir

# Resource and log keys the resources plugin (or an extension) may set; anything else in
# host_config (Binds, Privileged, PidMode, Devices, ...) is refused.
ALLOWED_HOST_CONFIG = frozenset({
    "Memory", "MemoryReservation", "MemorySwap", "MemorySwappiness", "NanoCpus", "CpuShares",
    "CpuQuota", "CpuPeriod", "CpusetCpus", "PidsLimit", "Ulimits", "LogConfig", "ShmSize",
    "BlkioWeight", "OomScoreAdj",
})
_BAD_SECURITY_OPT = re.compile(
    r"^(seccomp[=:]unconfined|apparmor[=:]unconfined|label[=:]disable|systempaths[=:]unconfined"
    r"|no-new-privileges[=:]false)$",
    re.IGNORECASE,
)
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}\Z")
_ENV_KEY = re.compile(r"^[^=\x00]{1,256}\Z")
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                  "/var/run/docker", "/run/containerd")


# Shorter environment values are not searched for in text: they would match innocent words.
MIN_MATCHED_VALUE = 4


def redact(text: str, values: Iterable[str]) -> str:
    """``text`` with each value (of MIN_MATCHED_VALUE+ characters) replaced by ``***``: an
    engine's or a data plane's message may echo a secret environment value back."""
    for value in values:
        if len(value) >= MIN_MATCHED_VALUE:
            text = text.replace(value, "***")
    return text


def refuse(message: str) -> ApiError:
    return ApiError(403, "sandbox_policy_violation", message)


def forbidden_paths(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """Host paths no sandbox may see, resolved (symlinks followed): name -> path."""
    out = {
        "DATA_DIR": settings.data_path,
        "master.key": settings.data_path / "master.key",
        "~/.codex": auth_dir(settings),
        "the Codex auth directory ~/.codex": Path("~/.codex").expanduser(),
    }
    for sock in DOCKER_SOCKETS:
        out[f"the Docker socket {sock}"] = Path(sock)
    for env in (environ, os.environ):
        url = urlparse(env.get("DOCKER_HOST", ""))
        if url.scheme == "unix" and url.path:
            out[f"the Docker socket {url.path}"] = Path(url.path)
    return {name: os.path.realpath(path) for name, path in out.items()}


def _path_text(path: str) -> bool:
    """Whether the OS could take ``path`` at all: no NUL, and text that encodes to bytes."""
    try:
        return "\x00" not in path and bool(os.fsencode(path))
    except UnicodeEncodeError:
        return False


def overlaps(a: str, b: str) -> bool:
    """Normalised absolute paths: one is the other, or lies inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def exposed(source: str, settings: Settings, environ: Mapping[str, str]) -> str | None:
    """The forbidden path a bind of ``source`` would expose (itself, inside or below), or None."""
    real = os.path.realpath(source)
    for name, path in forbidden_paths(settings, environ).items():
        if overlaps(real, path):
            return name
    return None


def check_spec(spec: ContainerSpec, settings: Settings, environ: Mapping[str, str]) -> None:
    """Raise 403 ``sandbox_policy_violation`` unless the spec is safe to create."""
    _check_mounts(spec, settings, environ)
    _check_host(spec)
    _check_items(spec, settings)
    for key, value in spec.env.items():
        if not _ENV_KEY.match(key) or "\x00" in value:
            raise refuse(f"environment entry {key[:40]!r} is not a valid NAME=value pair.")


def _check_mounts(spec: ContainerSpec, settings: Settings, environ: Mapping[str, str]) -> None:
    targets: set[str] = set()
    for m in spec.mounts:
        if m.type not in ("bind", "volume", "tmpfs"):
            raise refuse(f"mount type {m.type!r} at {m.target} is not allowed (bind, volume or tmpfs).")
        if not m.target.startswith("/") or posixpath.normpath(m.target) != m.target or m.target == "/":
            raise refuse(f"mount target {m.target!r} must be a normalised absolute path other than /.")
        if m.target in targets:
            raise refuse(f"two mounts target {m.target}.")
        targets.add(m.target)
        if m.type == "bind":
            if not os.path.isabs(m.source) or not _path_text(m.source):
                raise refuse(f"bind mount source {m.source!r} must be an absolute host path.")
            hit = exposed(m.source, settings, environ)
            if hit:
                raise refuse(f"a plugin asked to mount {m.source} at {m.target}, which exposes {hit}; "
                             "DATA_DIR, master.key, the Docker socket and ~/.codex are never mounted.")
        elif m.type == "volume" and m.source and not _VOLUME_NAME.match(m.source):
            raise refuse(f"volume name {m.source!r} is not a valid Docker volume name.")


def _check_host(spec: ContainerSpec) -> None:
    extra = sorted(set(spec.host_config) - ALLOWED_HOST_CONFIG)
    if extra:
        raise refuse(f"host_config key(s) {', '.join(extra)} are not allowed in a sandbox spec.")
    if spec.network == "host" or spec.network.startswith("container:"):
        raise refuse(f"network {spec.network!r} would share another network namespace; not allowed.")
    for opt in spec.security_opt:
        if _BAD_SECURITY_OPT.match(opt):
            raise refuse(f"security option {opt!r} switches a protection off; not allowed.")
    if not spec.user:
        raise refuse("the spec has no container user; the image's default user is never trusted.")


def _check_items(spec: ContainerSpec, settings: Settings) -> None:
    sec = settings.codex.sandbox.security
    if sec.drop_capabilities and ("ALL" not in spec.cap_drop or spec.cap_add):
        raise refuse("dropCapabilities is on but the spec does not drop ALL capabilities "
                     "(or adds some back); is the sandbox.cap_drop plugin disabled?")
    if sec.no_new_privileges and not any(o.startswith("no-new-privileges") for o in spec.security_opt):
        raise refuse("noNewPrivileges is on but the spec lacks no-new-privileges; "
                     "is the sandbox.no_new_privileges plugin disabled?")
    if sec.gvisor and spec.runtime != "runsc":
        raise refuse(f"gvisor is on but the spec's runtime is {spec.runtime or 'runc'!r}, not runsc; "
                     "is the sandbox.gvisor plugin disabled?")
    if sec.seccomp_profile and not any(o.startswith("seccomp=") for o in spec.security_opt):
        raise refuse("seccompProfile is set but the spec carries no seccomp profile; "
                     "is the sandbox.seccomp plugin disabled?")
    if sec.read_only_rootfs and not spec.read_only_rootfs:
        raise refuse("readOnlyRootfs is on but the spec's root filesystem is writable.")
