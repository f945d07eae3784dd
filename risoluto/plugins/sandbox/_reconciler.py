"""Removals the engine has not confirmed, retried while the kernel runs (not a plugin).

A removal fails when the engine is down, restarting (dockerd answers "database not open" while
it shuts down), frozen, or refuses for a while (a volume is in use until its container is
gone). The runtime hands what it could not remove to the reconciler, which tries again after
``RETRY_FIRST_S``, then at doubling intervals up to ``RETRY_MAX_S``, and at once when an engine
call succeeds after a failed one (the engine is back). An object is done when the engine has
removed it or says it does not exist (404); never before, so a sandbox record says
``removed: true`` only once the engine confirmed it. What is still pending at shutdown is
removed at the next start (found by label and by name).

Objects of one sandbox are a group, tried in order (its container before its volumes, which
stay in use until the container is gone): after the first failure the rest of the group waits
for the next round, so a frozen engine costs one deadline per round, not one per object.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import anyio
import attrs

from ...errors import ApiError

log = logging.getLogger("risoluto.sandbox")
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 30.0
UNAVAILABLE = "sandbox_runtime_unavailable"

# ("container", id or name) or ("volume", name)
Item = tuple[str, str]
Items = list[Item]


@attrs.define(eq=False)
class Group:
    items: Items
    then: Callable[[], None] | None = None  # called once every item is confirmed


class Reconciler:
    def __init__(self, remove_one: Callable[[str, str], Awaitable[None]]):
        """``remove_one(kind, ref)`` returns once the engine removed it or says it is not there
        (the runtime's call, 404 included) and raises otherwise."""
        self._remove_one = remove_one
        self._groups: list[Group] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._delay = RETRY_FIRST_S
        self._failed_last = False
        self._engine_gone = False
        self._in_round = False
        self._closed = False

    def pending(self) -> Items:
        return [item for group in self._groups for item in group.items]

    async def remove(self, items: Items, then: Callable[[], None] | None = None) -> bool:
        """Remove ``items`` in order now; what fails is retried in the background. True when
        all are confirmed now (``then`` has then been called), False when some are pending."""
        group = Group(list(items), then)
        if await self._attempt(group):
            return True
        self._groups.append(group)
        self._start()
        return False

    async def remove_each(self, items: Items) -> int:
        """Remove unrelated objects (leftovers), each on its own: one refusal does not hold back
        the others. After a failure for want of an engine the rest is deferred, not tried (one
        deadline, not one per object). The number confirmed now."""
        done = 0
        self._engine_gone = False
        for n, item in enumerate(items):
            if self._engine_gone:
                for rest in items[n:]:
                    self.defer([rest])
                break
            done += await self.remove([item])
        return done

    def defer(self, items: Items, then: Callable[[], None] | None = None) -> None:
        """Leave ``items`` to the background without trying now (the engine is known to be down)."""
        group = Group(list(items), then)
        if not group.items:
            self._done(group)
            return
        self._groups.append(group)
        self._failed_last = True
        self._start()

    def _done(self, group: Group) -> None:
        if group.then is not None:
            try:
                group.then()
            except Exception:
                log.exception("a removal callback failed")

    def engine_answered(self) -> None:
        """An engine call succeeded: if the last round failed, retry now rather than later."""
        if self._failed_last and self._groups and self._wake is not None and not self._in_round:
            self._failed_last = False
            self._delay = RETRY_FIRST_S
            self._wake.set()

    async def _attempt(self, group: Group) -> bool:
        while group.items:
            kind, ref = group.items[0]
            try:
                await self._remove_one(kind, ref)
            except Exception as exc:
                why = exc.code if isinstance(exc, ApiError) else type(exc).__name__
                log.warning("removing %s %s failed (%s); it is retried", kind, ref[:24], why)
                self._failed_last = True
                self._engine_gone = why == UNAVAILABLE
                return False
            group.items.pop(0)
            self._engine_gone = False
        self._done(group)
        return True

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        assert self._wake is not None
        try:
            while self._groups:
                with anyio.move_on_after(self._delay):
                    await self._wake.wait()
                self._wake.clear()
                if await self.round():
                    self._delay = RETRY_FIRST_S
                else:
                    self._delay = min(self._delay * 2, RETRY_MAX_S)
        finally:
            self._task = None

    async def round(self) -> bool:
        """One try of every pending group; True when nothing is left."""
        self._in_round = True
        try:
            for group in list(self._groups):
                if await self._attempt(group):
                    self._groups.remove(group)
                elif self._engine_gone:
                    break  # no engine: the others wait for the next round too (one deadline per round)
        finally:
            self._in_round = False
        if not self._groups:
            log.info("every pending removal is confirmed by the engine")
        return not self._groups

    async def close(self, budget_s: float) -> None:
        """Stop retrying in the background; one last round within ``budget_s``."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await asyncio.gather(self._task, return_exceptions=True)
        if self._groups:
            with anyio.move_on_after(budget_s):
                await self.round()
        if self._groups:
            log.warning("%d object(s) could not be removed before shutdown; they are removed at the next "
                        "start", len(self.pending()))
