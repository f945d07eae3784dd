"""Workspace roots the kernel refuses, and what a failed launch made (not a plugin itself).

The second half, ``launch_scope``: one launch of an issue at a time from its workspace to its
start, and a failed launch removes the workspace directory it made (only that one, only empty).

Every ``<root>/<issue>`` becomes a read-write bind mount of a container, and an issue id
picks the child: a root at ``/etc`` hands ``/etc/cron.d`` to a worker, one above DATA_DIR or
Docker's data root hands over the kernel's secrets or every container's layers. So a root is
refused, at startup and in the doctor, when it resolves (symlinks followed) to:

- ``/`` or a system directory: ``/etc /usr /bin /sbin /lib* /boot /dev /proc /sys /run /var
  /root /home`` themselves, or anything inside ``/etc /boot /dev /proc /sys /bin /sbin /lib*``
  and ``/usr`` (except ``/usr/local``), where no workspace belongs;
- Docker's data root (the engine's ``DockerRootDir`` when it answers, else ``/var/lib/docker``;
  with ``sandbox.runtime: remote`` always ``/var/lib/docker``),
  anything inside it, or an ancestor of it;
- DATA_DIR, anything inside it, or an ancestor of it; the kernel's own code or an ancestor of it;
- a directory (or an existing ancestor) that others may write to without the sticky bit, where
  another user could swap the root or a workspace for a symlink.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import stat
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import anyio
import attrs

log = logging.getLogger("risoluto.sandbox")

SYSTEM_DIRS = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/dev", "/proc", "/sys", "/run", "/var", "/root", "/home")
# below these, nothing is a workspace: configuration, pseudo file systems, installed programs
SYSTEM_TREES = ("/etc", "/boot", "/dev", "/proc", "/sys", "/bin", "/sbin", "/usr")
DEFAULT_DOCKER_ROOT = "/var/lib/docker"
CODE_DIR = Path(__file__).resolve().parents[2]  # the ``risoluto`` package
ENGINE_TIMEOUT_S = 3


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _system_dir(root: str) -> str | None:
    """The system directory ``root`` is, or lies inside where no workspace belongs."""
    top = "/" + root.lstrip("/").split("/", 1)[0]
    candidates = [(d, os.path.realpath(d)) for d in SYSTEM_DIRS]
    if top.startswith("/lib"):  # /lib, /lib32, /lib64, /libx32
        candidates.append((top, os.path.realpath(top)))
    for name, real in candidates:
        if root in (name, real):
            return name
        if name in SYSTEM_TREES or name.startswith("/lib"):
            if name == "/usr" and (_inside(root, "/usr/local") or _inside(root, os.path.realpath("/usr/local"))):
                continue
            if _inside(root, name) or _inside(root, real):
                return name
    return None


@functools.lru_cache(maxsize=8)
def _engine_root(docker_host: str) -> str | None:
    """``DockerRootDir`` of the engine at ``docker_host``; None if it does not answer (asked once)."""
    from ...docker_transport import from_env

    env = {"DOCKER_HOST": docker_host} if docker_host else {}
    try:
        client = from_env(env, timeout=ENGINE_TIMEOUT_S, pool=1)
    except Exception:
        return None
    try:
        value = client.info().get("DockerRootDir")
    except Exception:
        return None
    finally:
        client.close()
    return value if isinstance(value, str) and value.startswith("/") else None


def docker_root(environ: Mapping[str, str]) -> str:
    """Docker's data root: the engine's answer when it answers, else the default."""
    return os.path.realpath(_engine_root(environ.get("DOCKER_HOST", "")) or DEFAULT_DOCKER_ROOT)


def _writable_by_others(root: Path) -> str | None:
    """The first of ``root`` and its existing ancestors that others may write without the sticky bit."""
    for path in (root, *root.parents):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            return str(path)
    return None


def root_problem(settings: Any, environ: Mapping[str, str], resolved: str | None = None) -> str | None:
    """Why ``workspace.root`` is refused (one sentence naming the path), or None."""
    from ._naming import workspace_root

    try:
        root = resolved or os.path.realpath(workspace_root(settings))
    except (ValueError, UnicodeEncodeError):  # NUL, a lone surrogate: no file system takes it
        return f"workspace.root {settings.workspace.root!r} is not a path the system can use"
    shown = f"workspace.root {settings.workspace.root!r} resolves to {root}"
    if root == "/":
        return f"{shown}, the whole file system"
    system = _system_dir(root)
    if system is not None:
        return f"{shown}, which is (or lies inside) the system directory {system}"
    # only a kernel that runs its sandboxes on this host's engine asks it (a control plane with
    # sandbox.runtime: remote has no engine to ask: the usual place is checked)
    local = getattr(settings.sandbox, "runtime", "docker") == "docker"
    engine = docker_root(environ) if local else os.path.realpath(DEFAULT_DOCKER_ROOT)
    if _inside(root, engine) or _inside(engine, root):
        return f"{shown}, which overlaps Docker's data root {engine}"
    data = os.path.realpath(settings.data_path)
    if _inside(root, data) or _inside(data, root):
        return f"{shown}, which overlaps DATA_DIR {data}"
    if _inside(str(CODE_DIR), root):
        return f"{shown}, which holds the kernel's own code {CODE_DIR}"
    open_dir = _writable_by_others(Path(root))
    if open_dir is not None:
        return f"{shown}; {open_dir} is writable by other users without the sticky bit"
    return None


FIX = ("set workspace.root to a directory of its own that only the kernel's user can write to, e.g. "
       "/srv/risoluto/workspaces (not a system directory, DATA_DIR, Docker's data root or an ancestor of them)")


# --- what a launch made, and taking it back -------------------------------------------------
@attrs.frozen
class Made:
    """A workspace directory one launch created (its identity, so a later one is never taken)."""

    path: Path
    device: int
    inode: int


_made: contextvars.ContextVar[list[Made] | None] = contextvars.ContextVar("risoluto_workspaces_made", default=None)


def record_made(path: Path) -> None:
    """Called right after ``mkdir`` succeeded (the directory did not exist before this launch)."""
    made = _made.get()
    if made is not None:
        st = os.lstat(path)
        made.append(Made(path, st.st_dev, st.st_ino))


def _issue_lock(state: dict[str, Any], key: str) -> anyio.Lock:
    locks: weakref.WeakValueDictionary[str, anyio.Lock] = state.setdefault(
        "sandbox.workspace_locks", weakref.WeakValueDictionary())
    lock = locks.get(key)
    if lock is None:
        lock = locks[key] = anyio.Lock()
    return lock


@contextlib.asynccontextmanager
async def launch_scope(state: dict[str, Any], key: str) -> AsyncIterator[None]:
    """One launch of issue ``key`` at a time, from its workspace to its start; if it fails, the
    directories it created (and only those) are removed when still empty.

    The lock makes "still empty and no other launch holds it" true when the removal happens:
    a second launch of the issue waits, then finds (or makes) the directory itself.
    """
    lock = _issue_lock(state, key)  # a strong reference for as long as the launch runs
    async with lock:
        made: list[Made] = []
        token = _made.set(made)
        try:
            yield
        except BaseException:
            for item in made:
                remove_if_unused(item)
            raise
        finally:
            _made.reset(token)


def remove_if_unused(item: Made) -> None:
    try:
        st = os.lstat(item.path)
        if (st.st_dev, st.st_ino) != (item.device, item.inode):
            return  # replaced meanwhile: not ours any more
        os.rmdir(item.path)  # fails on a directory that is not empty: it is then kept
    except OSError:
        return
    log.info("removed %s, made by a launch that failed", item.path)
