"""The sandbox runtime's life in a kernel: select it (``risoluto_sandbox_runtime``), install it as
``kernel.runtime`` with its event observer, clean up what a crashed run of this DATA_DIR left, and
close it at shutdown. A private library of the sandbox plugins (the API's service, the data plane,
the CLI share it)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from ...errors import ApiError
from . import _owner
from ._launcher import launch
from ._metrics import metrics_for

log = logging.getLogger("risoluto.sandbox")
SKIP_CLEANUP = "sandbox.skip_orphan_cleanup"


def install_runtime(kernel: Any, runtime: Any, relay: Callable[[Any], None] | None = None) -> None:
    """Make ``runtime`` the kernel's; its events go to the sandbox metrics, then ``relay`` (if
    given), then the ``risoluto_sandbox_event`` hook."""
    metrics = metrics_for(kernel)

    def observe(event: Any) -> None:
        metrics.observe(event)
        if relay is not None:
            relay(event)
        kernel.hooks.sandbox_event(event)

    if hasattr(runtime, "attach"):
        runtime.attach(kernel, observe)
    kernel.runtime = runtime
    _owner.hold(kernel)  # while held, the doctor knows these sandboxes have a live owner


async def remove_leftovers(runtime: Any) -> None:
    """What a crashed run of this DATA_DIR left on the engine; without an engine, a warning."""
    try:
        await runtime.cleanup_orphans()
    except ApiError as err:  # Docker absent: start anyway, report on use and in the doctor
        log.warning("sandbox runtime not usable yet: %s (what a previous run left is removed once the "
                    "engine answers)", err.message)


async def close_runtime(kernel: Any) -> None:
    runtime, kernel.runtime = kernel.runtime, None
    try:
        if runtime is not None:
            await runtime.close()
    finally:
        _owner.release(kernel)


class SandboxService:
    """Chooses the runtime (``risoluto_sandbox_runtime``), sets ``kernel.runtime``, cleans up
    what a crashed run of this DATA_DIR left behind, and stops running sandboxes on shutdown."""

    name = "sandbox.runtime"

    def __init__(self, kernel: Any):
        self.kernel = kernel

    async def start(self) -> None:
        kernel = self.kernel
        runtime = kernel.hooks.sandbox_runtime(kernel.settings)
        if runtime is None:
            log.warning("no sandbox runtime for sandbox.runtime=%r; sandbox routes answer 503",
                        kernel.settings.sandbox.runtime)
            return
        install_runtime(kernel, runtime)
        # What `doctor --probe` launches its canary with: the same path as the API.
        kernel.launch_sandbox = functools.partial(launch, kernel)
        if not kernel.state.get(SKIP_CLEANUP):
            await remove_leftovers(runtime)

    async def stop(self) -> None:
        self.kernel.launch_sandbox = None
        await close_runtime(self.kernel)
