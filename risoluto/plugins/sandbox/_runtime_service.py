"""The sandbox runtime's life in a kernel, around what the kernel does (``risoluto.backends``
chooses the runtime, holds it as ``kernel.backends.runtime`` and closes it at shutdown): attach
the event observer, hold this DATA_DIR's owner lock, clean up what a crashed run of this DATA_DIR
left. A private library of the sandbox plugins (the API's service, the data plane, the CLI
share it)."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ...errors import ApiError
from . import _owner
from ._metrics import metrics_for

log = logging.getLogger("risoluto.sandbox")
SKIP_CLEANUP = "sandbox.skip_orphan_cleanup"


def install_runtime(kernel: Any, runtime: Any, relay: Callable[[Any], None] | None = None) -> None:
    """Wire the kernel's ``runtime``: its events go to the sandbox metrics, then ``relay`` (if
    given), then the ``risoluto_sandbox_event`` hook."""
    metrics = metrics_for(kernel)

    def observe(event: Any) -> None:
        metrics.observe(event)
        if relay is not None:
            relay(event)
        kernel.hooks.sandbox_event(event)

    if hasattr(runtime, "attach"):
        runtime.attach(kernel, observe)
    _owner.hold(kernel)  # while held, the doctor knows these sandboxes have a live owner


async def remove_leftovers(runtime: Any) -> None:
    """What a crashed run of this DATA_DIR left on the engine; without an engine, a warning."""
    try:
        await runtime.cleanup_orphans()
    except ApiError as err:  # Docker absent: start anyway, report on use and in the doctor
        log.warning("sandbox runtime not usable yet: %s (what a previous run left is removed once the "
                    "engine answers)", err.message)


def release_runtime(kernel: Any) -> None:
    """At stop; the kernel closes the runtime after the services stopped."""
    _owner.release(kernel)


class SandboxService:
    """Wires the runtime the kernel chose (``kernel.backends.runtime``) and cleans up what a
    crashed run of this DATA_DIR left behind."""

    name = "sandbox.runtime"

    def __init__(self, kernel: Any):
        self.kernel = kernel

    async def start(self) -> None:
        kernel = self.kernel
        runtime = kernel.backends.runtime
        if runtime is None:  # the kernel fails startup first; only a kernel that is not running
            return
        install_runtime(kernel, runtime)
        if not kernel.state.get(SKIP_CLEANUP):
            await remove_leftovers(runtime)

    async def stop(self) -> None:
        release_runtime(self.kernel)
