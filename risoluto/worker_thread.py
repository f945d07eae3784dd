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
import queue
import threading
from typing import Any, Callable

import anyio


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class WorkerThread:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # trio or another anyio backend
            return await anyio.to_thread.run_sync(self.call, fn, *args)
        return await self._run_asyncio(fn, args)

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

    async def _run_asyncio(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def job() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, fut, None, exc)
                return
            loop.call_soon_threadsafe(_settle, fut, result, None)

        self._jobs.put(job)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            while not fut.done():  # finish waiting, then let the cancellation through
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: no "exception was never retrieved" noise
            raise

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
