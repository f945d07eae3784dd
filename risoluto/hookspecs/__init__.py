"""The contract between the kernel and its plugins.

Every hook is synchronous (pluggy cannot await; an ``async def`` implementation of a
``firstresult`` hook would always "win" with a coroutine). Asynchronous work lives in
the objects hooks return: stores, limiters, runtimes, services.
"""

from __future__ import annotations

import pluggy

PROJECT = "risoluto"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

SPEC_MODULES = (
    "risoluto.hookspecs.app",
    "risoluto.hookspecs.auth",
    "risoluto.hookspecs.ratelimit",
    "risoluto.hookspecs.secrets",
    "risoluto.hookspecs.sandbox",
    "risoluto.hookspecs.egress",
    "risoluto.hookspecs.webhooks",
    "risoluto.hookspecs.doctor",
    "risoluto.hookspecs.cli",
)
