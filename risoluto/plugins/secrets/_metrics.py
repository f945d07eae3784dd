"""Secret operations counter: a thin wrapper that counts every call on the live store.

Helper module (no hooks). The counter lives in the kernel's own registry (one per app),
labelled by operation, backend and outcome; never by key name (names of secrets are not
values, but a label per name would let a client grow the registry without bound).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

if TYPE_CHECKING:
    from risoluto.hookspecs.secrets import SecretStore
    from risoluto.kernel import Kernel

METRIC = "risoluto_secret_operations"


def operations_counter(kernel: Kernel) -> Counter:
    state = kernel.state.setdefault("secrets", {})
    if "operations" not in state:
        state["operations"] = Counter(
            METRIC, "Secret store operations by operation, backend and outcome.",
            ["operation", "backend", "outcome"], registry=kernel.metrics_registry,
        )
    return state["operations"]


class CountingStore:
    """Delegates to ``store``; counts list/get/set/set_many/delete/rotate."""

    def __init__(self, store: SecretStore, counter: Counter):
        self._store = store
        self._counter = counter

    def __getattr__(self, name: str) -> Any:  # backend, location, damaged, ...
        return getattr(self._store, name)

    async def _call(self, operation: str, *args: Any) -> Any:
        outcome = "error"
        try:
            result = await getattr(self._store, operation)(*args)
            outcome = "ok"
            return result
        finally:
            self._counter.labels(operation, self._store.backend, outcome).inc()

    async def open(self) -> None:
        await self._store.open()

    async def close(self) -> None:
        await self._store.close()

    async def list(self) -> list[str]:
        return await self._call("list")

    async def get(self, name: str) -> str | None:
        return await self._call("get", name)

    async def set(self, name: str, value: str) -> None:
        await self._call("set", name, value)

    async def set_many(self, items: dict[str, str]) -> None:
        await self._call("set_many", items)

    async def delete(self, name: str) -> bool:
        return await self._call("delete", name)

    async def rotate(self, new_master_key: str) -> None:
        await self._call("rotate", new_master_key)
