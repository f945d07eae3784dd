"""One dedicated thread per SQLite connection (the aiosqlite pattern): the secret store's
and the webhook inbox's. Neither takes a thread from anyio's shared pool, so a locked
database file never starves other work of threads.

Why not ``anyio.to_thread.run_sync`` for every call: a connection belongs on one thread,
and the hand-off here is a ``SimpleQueue`` put plus one ``call_soon_threadsafe``, about a
third of a ``to_thread`` round trip (measured by ``bench/secrets.py``; on a disk whose
fsync takes ~250 us that round trip alone was half the cost of a durable commit). On
asyncio (Quart's loop) the result comes back directly; on any other anyio backend the
call goes through ``anyio.to_thread`` and waits for the same thread, so it stays correct.

Like ``to_thread``, a cancelled caller still waits for its job to finish: a write is
never reported as failed while it goes on to commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from typing import Any, Callable

import anyio

log = logging.getLogger("risoluto")


class _JobFuture(asyncio.Future):  # type: ignore[type-arg]
    """A job's result, which cannot be cancelled: the job runs on regardless.

    Cancelling the task that awaits it (a disconnect, a timeout) therefore takes effect once
    the job has finished: ``Task.cancel`` marks the task when its waiter refuses, and throws
    CancelledError in at the next step. Same outcome as ``await shield(fut)`` in a loop, with
    one trip round the event loop fewer per call.
    """

    first_cancel: tuple[Any] | None = None  # (message,) of the first cancel() it refused

    def cancel(self, msg: Any = None) -> bool:
        if self.first_cancel is None:
            self.first_cancel = (msg,)
        return False


class WorkerThread:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job reports its own errors; this is a bug, and must not end the thread
                log.exception("a job on %s failed outside its error handling", self._thread.name)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio or another anyio backend
            return await anyio.to_thread.run_sync(self.call, fn, *args)
        return await self._run_asyncio(loop, fn, args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the worker and block for its result (from any other thread)."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def job() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)

        self._jobs.put(job)
        return done.result()

    async def _run_asyncio(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
                           args: tuple[Any, ...]) -> Any:
        fut = _JobFuture(loop=loop)

        def job() -> None:
            settle: Callable[[Any], None]
            try:
                settle, outcome = fut.set_result, fn(*args)
            except BaseException as exc:
                outcome = exc
                if isinstance(exc, StopIteration):  # a Future refuses it, and would never settle
                    outcome = RuntimeError("the job raised StopIteration")
                    outcome.__cause__ = exc
                settle = fut.set_exception
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(settle, outcome)

        self._jobs.put(job)
        # a failed job's exception counts as retrieved even when the caller was cancelled:
        # Task wakes on a Future subclass through its result()
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancels that came while the job ran arrive as one, with the last one's message.
            # asyncio would have delivered the first at once, and anyio knows its own scope's by
            # the message, so the caller sees the first (as with the shield() this replaced).
            if fut.first_cancel is None:  # the job itself raised CancelledError
                raise
            raise asyncio.CancelledError(*[m for m in fut.first_cancel if m is not None]) from None

    def stop(self) -> None:
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


async def started(name: str, opener: Callable[[], None]) -> WorkerThread:
    """A new worker that has run ``opener`` (opening its connection); stopped again if it raised."""
    thread = WorkerThread(name)
    try:
        await thread.run(opener)
    except BaseException:
        thread.stop()
        raise
    return thread


async def finished(thread: WorkerThread | None, closer: Callable[[], None]) -> None:
    """Run ``closer`` (closing the connection) on ``thread``, then stop it; nothing if None."""
    if thread is None:
        return
    try:
        await thread.run(closer)
    finally:
        thread.stop()
