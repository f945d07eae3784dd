"""risoluto.worker_thread: a cancelled caller still waits for its job, results and errors come
back on asyncio and on trio, and jobs run one at a time in submission order."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time

import anyio
import pytest

from risoluto.worker_thread import WorkerThread


@pytest.fixture
def worker():
    thread = WorkerThread("test-worker")
    yield thread
    thread.stop()


def gated_job(gate: threading.Event, log: list[str]):
    def job() -> str:
        log.append("started")
        assert gate.wait(10)
        log.append("finished")
        return "result"
    return job


def test_a_cancelled_caller_waits_for_its_job_then_sees_the_cancellation(worker):
    gate, log = threading.Event(), []

    async def main() -> None:
        task = asyncio.ensure_future(worker.run(gated_job(gate, log)))
        while log != ["started"]:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done(), "the caller returned while its job was still running"
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log == ["started", "finished"]

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_cancel_scope_ends_only_after_the_job(worker, backend):
    gate, log = threading.Event(), []
    threading.Timer(0.2, gate.set).start()

    async def main() -> None:
        t0 = time.monotonic()
        with anyio.move_on_after(0.02):
            await worker.run(gated_job(gate, log))
        assert log == ["started", "finished"]
        assert time.monotonic() - t0 >= 0.15

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_results_errors_and_order(worker, backend):
    seen: list[int] = []

    def boom() -> None:
        raise KeyError("nope")

    async def main() -> None:
        assert await worker.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(KeyError, match="nope"):
            await worker.run(boom)
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(worker.run, seen.append, i)
        # one at a time always; in submission order on asyncio (on trio each call first
        # takes a thread of anyio's, and those race to the queue)
        assert sorted(seen) == list(range(20))
        if backend == "asyncio":
            assert seen == list(range(20))
        assert len({threading.get_ident(), await worker.run(threading.get_ident)}) == 2

    anyio.run(main, backend=backend)


def test_a_job_raising_stopiteration_does_not_hang_its_caller(worker):
    raised: list[BaseException] = []

    async def main() -> None:
        try:
            await worker.run(next, iter(()))
        except BaseException as exc:
            raised.append(exc)

    # a caller cannot be cancelled out of waiting for its job, so a hang is caught from outside
    caller = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    caller.start()
    caller.join(5)
    assert not caller.is_alive(), "the caller never got its job's outcome"
    assert isinstance(raised[0], RuntimeError) and "StopIteration" in str(raised[0])


def test_a_failed_job_of_a_cancelled_caller_is_not_reported_as_unretrieved(worker, caplog):
    gate = threading.Event()

    def fails() -> None:
        assert gate.wait(10)
        raise ValueError("after the caller left")

    async def main() -> None:
        task = asyncio.ensure_future(worker.run(fails))
        await asyncio.sleep(0.02)
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    assert "never retrieved" not in caplog.text


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the abandoned coroutine
def test_the_worker_outlives_a_caller_whose_loop_closed(worker):
    gate = threading.Event()

    async def leave_early() -> None:
        asyncio.ensure_future(worker.run(gate.wait, 10))
        await asyncio.sleep(0.01)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(leave_early())
    loop.close()  # while the job still runs (asyncio.run would wait for it)
    gate.set()

    answers: list[int] = []

    async def main() -> None:
        answers.append(await worker.run(lambda: 42))

    caller = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    caller.start()
    caller.join(5)
    assert answers == [42], "the worker thread died with the closed loop"


def test_cancels_that_pile_up_during_a_job_are_seen_as_the_first(worker):
    """An anyio deadline fires, then an asyncio timeout inside it, both while the job runs:
    asyncio would deliver the first at once, and anyio knows its own by the message."""
    async def main() -> str:
        with anyio.move_on_after(0.01) as scope:
            async with asyncio.timeout(0.05):
                await worker.run(time.sleep, 0.3)
        assert scope.cancelled_caught
        return "went on after the expired scope"

    assert anyio.run(main, backend="asyncio") == "went on after the expired scope"

    async def first_message() -> tuple:
        task = asyncio.ensure_future(worker.run(time.sleep, 0.2))
        await asyncio.sleep(0.02)
        task.cancel("first")
        await asyncio.sleep(0.02)
        task.cancel("second")
        try:
            await task
        except asyncio.CancelledError as exc:
            return exc.args
        return ()

    assert asyncio.run(first_message()) == ("first",)


def test_a_job_whose_error_handling_fails_leaves_the_worker_running(worker):
    class Unprintable:
        def __repr__(self) -> str:
            raise ValueError("no repr")

        def __call__(self) -> None:
            raise StopIteration

    outcomes: list[BaseException | int] = []

    async def main() -> None:
        try:
            await worker.run(Unprintable())
        except BaseException as exc:
            outcomes.append(exc)
        outcomes.append(await worker.run(lambda: 7))

    caller = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    caller.start()
    caller.join(5)
    assert not caller.is_alive(), "a caller hangs"
    assert isinstance(outcomes[0], RuntimeError) and isinstance(outcomes[0].__cause__, StopIteration)
    assert outcomes[1] == 7
