"""Unlock the secret store at startup: the app service that sets ``kernel.secret_store``
(``_access.open_store`` does the work; the CLI shares it)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from risoluto.hookspecs import hookimpl

from ._access import open_store
from ._metrics import CountingStore, operations_counter

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

log = logging.getLogger("risoluto.secrets")


class SecretsService:
    name = "secrets"

    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    async def start(self) -> None:
        kernel = self.kernel
        state: dict[str, Any] = kernel.state.setdefault("secrets", {})
        opened = await open_store(kernel.settings, kernel.hooks)
        if opened is None:
            state["status"] = "locked"
            log.warning("secrets are locked: %s", kernel.secrets_locked_reason)
            return
        damaged = getattr(opened.store, "damaged", {})
        if damaged:  # served as errors, never as values; the doctor lists them too
            log.error("secret(s) failing authentication in %s: %s", opened.store.location, ", ".join(sorted(damaged)))
        kernel.secret_store = CountingStore(opened.store, operations_counter(kernel))
        state.update(status="open", backend=opened.store.backend, key_source=opened.master_key.source)

    async def stop(self) -> None:
        store, self.kernel.secret_store = self.kernel.secret_store, None
        if store is not None:
            await store.close()


@hookimpl
def risoluto_app_services(kernel: Kernel) -> list[Any]:
    return [SecretsService(kernel)]
