"""Work that must run to its end even when the request that started it is cancelled.

Quart cancels a handler when its client disconnects. A handler that commits a write and then
records it (an audit line, a hand-off to consumers) could be cut between the two: the write
stays, its record is lost. ``to_the_end`` runs both as one task that outlives the handler.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine, TypeVar

log = logging.getLogger("risoluto")
T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()  # asyncio keeps only weak references to tasks
_orphaned: set[asyncio.Task[Any]] = set()  # their caller was cancelled: nobody sees their error


async def to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; if the caller is cancelled first, ``work`` still runs to its end."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_finished)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _orphaned.add(task)
        raise


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    orphaned = task in _orphaned
    _orphaned.discard(task)
    if task.cancelled():
        return
    exc = task.exception()  # retrieved here either way: no "never retrieved" noise
    if exc is not None and orphaned:
        log.warning("work finished after its client left, with an error: %s", type(exc).__name__)
