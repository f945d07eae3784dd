"""Say at startup what state the secret store is in. The kernel opens it (``risoluto.backends``:
key -> ``risoluto_secret_store`` -> ``open()``) and holds it as ``kernel.backends.secrets``; this
service only reports: locked and why, or damaged entries (served as errors, never as values)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from risoluto.hookspecs import hookimpl

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

log = logging.getLogger("risoluto.secrets")


class SecretsService:
    name = "secrets"

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    async def start(self) -> None:
        secrets = self.kernel.backends.secrets
        if secrets.store is None:
            log.warning("secrets are locked: %s", secrets.locked_reason)
            return
        damaged = getattr(secrets.store, "damaged", {})
        if damaged:  # the doctor lists them too
            log.error("secret(s) failing authentication in %s: %s", secrets.store.location, ", ".join(sorted(damaged)))

    async def stop(self) -> None:
        pass  # the kernel closes the store


@hookimpl
def risoluto_app_services(kernel: Kernel) -> list[Any]:
    return [SecretsService(kernel)]
