"""The sandbox runtime and the container spec every hardening plugin contributes to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Protocol

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..settings import Settings


@attrs.frozen(kw_only=True)
class LaunchRequest:
    """What the caller asked for (API, CLI or doctor probe)."""

    issue: str
    command: tuple[str, ...] = ()
    image: str = ""
    env: dict[str, str] = attrs.field(factory=dict)
    secrets: tuple[str, ...] = ()
    timeout_s: float | None = None
    # True when the spec is built only to show the effective policy
    # (``GET /api/v1/sandbox/policy``): contributions must not touch the host then.
    dry_run: bool = False


@attrs.define(kw_only=True)
class Mount:
    """A mount of the container. Volume labels ``risoluto.scope: attempt`` mark a volume the
    runtime creates for one launch and removes with the container; other volumes persist."""

    target: str
    source: str = ""  # host path (bind), volume name (volume), empty for tmpfs
    type: str = "bind"  # bind | volume | tmpfs
    read_only: bool = False
    tmpfs_size: int = 0
    labels: dict[str, str] = attrs.field(factory=dict)


@attrs.define(kw_only=True)
class ContainerSpec:
    """A container to create, built up by ``risoluto_sandbox_spec`` contributions.

    The runtime turns it into one Docker Engine API create call. ``env`` may hold secret
    values: it is sent only in the create call, never logged, labelled or returned.
    ``files`` are put into the container (path -> bytes) after create, before start.
    ``policy`` is the effective policy in the published checklist's terms; its digest
    becomes the ``risoluto.policy`` label.
    """

    name: str
    image: str
    command: list[str] = attrs.field(factory=list)
    user: str = ""
    env: dict[str, str] = attrs.field(factory=dict, repr=False)
    labels: dict[str, str] = attrs.field(factory=dict)
    mounts: list[Mount] = attrs.field(factory=list)
    files: dict[str, bytes] = attrs.field(factory=dict, repr=False)
    cap_drop: list[str] = attrs.field(factory=list)
    cap_add: list[str] = attrs.field(factory=list)
    security_opt: list[str] = attrs.field(factory=list)
    runtime: str = ""
    network: str = ""
    read_only_rootfs: bool = False
    working_dir: str = "/workspace"
    host_config: dict[str, Any] = attrs.field(factory=dict)  # resources, log config
    policy: dict[str, Any] = attrs.field(factory=dict)
    on_created: list[Any] = attrs.field(factory=list)  # async callables(container_id)
    on_removed: list[Any] = attrs.field(factory=list)  # async callables(container_id)


@attrs.frozen(kw_only=True)
class SandboxEvent:
    kind: str  # "created" | "started" | "exited" | "removed" | "failed"
    id: str
    issue: str
    exit_code: int | None = None
    oom_killed: bool = False
    seconds: float = 0.0
    reason: str = ""


class SandboxRuntime(Protocol):
    """Runs ContainerSpecs. Every method is async and may raise ApiError.

    Records are plain dicts (``id``, ``name``, ``issue``, ``status``, ``exit_code``,
    ``oom_killed``, ...) and never carry environment values.
    """

    name: str

    async def check(self) -> None:
        """Raise with a clear message if the runtime cannot run the current policy."""

    async def launch(self, spec: ContainerSpec, timeout_s: float) -> dict[str, Any]:
        """Create, fill, start; return the record once started. The wait for exit (and
        the stop at ``timeout_s``, then removal) runs in the background."""

    async def wait(self, sandbox_id: str) -> dict[str, Any]:
        """Block until the sandbox has exited and been cleaned up; return its record."""

    def stream_logs(self, sandbox_id: str) -> AsyncIterator[bytes]:
        """Output of a sandbox as it is produced, until it exits."""

    async def list(self) -> list[dict[str, Any]]: ...

    async def inspect(self, sandbox_id: str) -> dict[str, Any]: ...

    async def logs(self, sandbox_id: str) -> str: ...

    async def remove(self, sandbox_id: str) -> dict[str, Any]:
        """Stop (with grace) and remove; return the final record."""

    async def cleanup_orphans(self) -> int:
        """Remove containers (and per-attempt volumes) left by a crash of this instance."""

    async def close(self) -> None: ...


@hookspec(firstresult=True)
def risoluto_sandbox_runtime(kernel: Kernel, settings: Settings) -> SandboxRuntime | None:
    """Return the runtime backend named by ``sandbox.runtime`` (``docker``, ``remote``), or None.

    Called once at startup by the kernel, which holds the answer as ``kernel.backends.runtime``
    and closes it at shutdown; firstresult. No plugin answering is a startup error naming
    ``sandbox.runtime``. The ``sandbox.api`` service then calls the runtime's
    ``attach(kernel, observer)`` if it has one (live settings, events, metrics) and
    ``cleanup_orphans()``. Construct without connecting: the app must start when the engine is
    down (routes then answer 503 ``sandbox_runtime_unavailable``).

    Example::

        @hookimpl
        def risoluto_sandbox_runtime(settings):
            return PodmanRuntime(settings) if settings.sandbox.runtime == "podman" else None
    """


Launcher = Callable[[LaunchRequest, bool], Awaitable[dict[str, Any]]]
"""``(request, wait) -> record``: a launch through the whole launch path (secrets, both spec
phases, the egress enforcer, the runtime), as ``POST /api/v1/sandboxes`` launches."""


@hookspec(firstresult=True)
def risoluto_sandbox_launcher(kernel: Kernel) -> Launcher | None:
    """Return how to launch a sandbox the way the sandbox API does, or None; firstresult.

    ``risoluto doctor --probe`` launches its canary with it (waiting for the end), so the probes
    judge the live policy. The ``sandbox.api`` plugin answers; without an answer the probe is a
    FAIL, never a launch by another path.

    Example::

        @hookimpl
        def risoluto_sandbox_launcher(kernel):
            return functools.partial(my_launch, kernel)
    """


@hookspec
def risoluto_sandbox_spec(kernel: Kernel, spec: ContainerSpec, request: LaunchRequest, settings: Settings) -> None:
    """Edit phase: contribute to a container spec before launch by editing ``spec`` in place.

    Called once per launch (and once for the policy preview, ``request.dry_run``), for every
    plugin (collected), in two groups: first the default plugins, then every other plugin
    (entry points, plugins given to ``create_app``). So a third party's choice of, say, network,
    a mount or an environment entry stands over the defaults. Within the third-party group pluggy's
    order applies (later-registered first; ``tryfirst``/``trylast`` to move). Raise
    :class:`~risoluto.errors.ApiError` to refuse the launch. Record what you enforce in
    ``spec.policy`` (its digest becomes the ``risoluto.policy`` label). A ``Mount`` of type
    ``volume`` with an empty ``source`` is anonymous: created with the container, removed with it.

    After this phase the kernel attaches the egress enforcer (under an allowlist), then runs the
    check phase (``risoluto_sandbox_spec_check``): an edit that makes the spec unsafe is refused
    there, whoever made it.

    Example::

        @hookimpl
        def risoluto_sandbox_spec(spec, request, settings):
            spec.labels["team"] = "blue"
            spec.mounts.append(Mount(source="/srv/cache", target="/cache", read_only=True))
    """


@hookspec
def risoluto_sandbox_spec_check(kernel: Kernel, spec: ContainerSpec, request: LaunchRequest,
                                settings: Settings) -> None:
    """Check phase: judge the final spec; raise :class:`~risoluto.errors.ApiError` to refuse it.

    Called once per launch after every edit and the egress attach; collected. ``spec`` is a copy
    for reading only: a check that changes it refuses the launch (fail closed), so no check can
    hide a mount or a capability from the checks after it. The default ``sandbox.policy_guard``
    refuses (403 ``sandbox_policy_violation``) a spec that mounts DATA_DIR, master.key, the Docker
    socket or ``~/.codex``, sets ``host_config`` keys beyond resources and logs, shares the host
    network, adds a capability, or lacks an enabled checklist item; ``egress.allowlist`` refuses a
    spec under an allowlist that no enforcer attached to.

    Example::

        @hookimpl
        def risoluto_sandbox_spec_check(spec):
            if spec.image.startswith("untrusted/"):
                raise ApiError(403, "sandbox_policy_violation", "images from untrusted/ are not run")
    """


@hookspec
def risoluto_sandbox_event(kernel: Kernel, event: SandboxEvent) -> None:
    """Observe a sandbox lifecycle event (metrics, audit). Collected; must not raise.

    Example::

        @hookimpl
        def risoluto_sandbox_event(event):
            if event.kind == "exited" and event.oom_killed:
                alert(event.issue)
    """
