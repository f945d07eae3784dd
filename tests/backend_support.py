"""Test seam for the kernel's backends: put a fake in ``kernel.backends`` (a store, a locked
store) the way only the kernel may. Plugins cannot: the value is frozen and the property has no
setter (tests/test_backends.py); tests reach the runner's private ``current``."""

from __future__ import annotations

from typing import Any

import attrs

from risoluto.backends import SecretsBackend


def swap(kernel: Any, **changes: Any) -> None:
    kernel._backends.current = attrs.evolve(kernel.backends, **changes)


def use_store(kernel: Any, store: Any) -> None:
    swap(kernel, secrets=SecretsBackend.opened(store, "test"))


def lock_store(kernel: Any, reason: str = "locked by the test") -> None:
    swap(kernel, secrets=SecretsBackend.locked(reason))
