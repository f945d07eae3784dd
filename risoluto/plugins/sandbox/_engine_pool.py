"""A bounded pool of threads for Docker engine calls, each call with a deadline (not a plugin).

Why not anyio's worker threads: they share one limiter (40 threads) with every other blocking
call of the process (the file secret store, the overlay, the doctor). A frozen engine (dockerd
stopped, or stuck behind a full disk) holds every thread that calls it until its socket read
times out: 45 stuck engine calls once made a secret write wait 57 s. Engine calls here have
threads of their own, a fixed number of them, and:

- a call that finds no free thread fails at once (:class:`EngineBusy`): the engine is not
  keeping up, and queueing behind calls that may never return would only hide it;
- a call answers by its deadline (:class:`EngineTimeout`), even while its thread is still
  stuck in a socket read (a thread cannot be killed). The thread comes back when the client's
  socket timeout ends the read, and counts against the bound until then, so a frozen engine
  can hold at most ``size`` threads, whatever the number of requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Callable

import anyio


class EngineBusy(Exception):
    """Every thread of the pool is in a call (the engine is slow or frozen)."""


class EngineTimeout(Exception):
    """The call did not answer by its deadline (it may still be running in its thread)."""


class EnginePool:
    def __init__(self, name: str, size: int):
        self.name = name
        self.size = size
        self._busy = 0
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix=name)

    @property
    def busy(self) -> int:
        """Threads in a call now, abandoned ones included."""
        return self._busy

    async def run(self, fn: Callable[..., Any], *args: Any, deadline: float | None) -> Any:
        """``fn(*args)`` on a thread of the pool; its result by ``deadline`` seconds (None: no
        deadline). A cancelled caller leaves at once; the call runs on (it cannot be stopped)."""
        with self._lock:
            if self._busy >= self.size:
                raise EngineBusy(f"all {self.size} engine threads are in a call")
            self._busy += 1
        try:
            future = self._executor.submit(self._job, fn, args)
        except RuntimeError:  # shut down
            self._release()
            raise EngineBusy("the engine pool is closed") from None
        waiter = asyncio.wrap_future(future)
        waiter.add_done_callback(_retrieved)  # an abandoned call's failure is not "never retrieved"
        with anyio.move_on_after(deadline):
            return await asyncio.shield(waiter)
        raise EngineTimeout(f"no answer within {deadline:g} s")

    def _job(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return fn(*args)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1

    def close(self) -> None:
        """No new calls; threads still in a call end when their socket read does."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
