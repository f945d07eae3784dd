"""The runtime's engine pool (bounded, a deadline per call) and its removal reconciler, without
an engine: calls that block the way a frozen engine's socket read does, removals that fail the way
a restarting engine's do. The same behaviour against real engines: tests/test_engine_faults.py."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from risoluto.errors import ApiError
from risoluto.plugins.sandbox import _reconciler
from risoluto.plugins.sandbox._engine_pool import EngineBusy, EnginePool, EngineTimeout
from risoluto.plugins.sandbox._reconciler import Reconciler

pytestmark = pytest.mark.anyio


async def test_a_stuck_call_answers_by_its_deadline_and_a_full_pool_refuses_at_once():
    pool = EnginePool("test-engine", 2)
    release = threading.Event()

    def stuck() -> str:  # a read from a frozen engine, until its socket timeout
        release.wait(30)
        return "late"

    try:
        async with anyio.create_task_group() as tg:
            outcomes: list[tuple[str, float]] = []

            async def call() -> None:
                t0 = time.monotonic()
                try:
                    await pool.run(stuck, deadline=0.5)
                    outcomes.append(("answered", time.monotonic() - t0))
                except EngineTimeout:
                    outcomes.append(("timeout", time.monotonic() - t0))

            tg.start_soon(call)
            tg.start_soon(call)
            await anyio.sleep(0.1)
            t0 = time.monotonic()
            with pytest.raises(EngineBusy):  # both threads are in a call: no queueing behind them
                await pool.run(lambda: "never", deadline=5)
            assert time.monotonic() - t0 < 0.1
        assert [o for o, _ in outcomes] == ["timeout", "timeout"]
        assert all(0.4 < s < 2.0 for _, s in outcomes), outcomes
        # the callers have their answer; the threads are still stuck and still count
        assert pool.busy == 2
        with pytest.raises(EngineBusy):
            await pool.run(lambda: "never", deadline=5)
    finally:
        release.set()  # the socket timeout ends the reads
    with anyio.fail_after(5):
        while pool.busy:
            await anyio.sleep(0.01)
    assert await pool.run(lambda: "fresh", deadline=1) == "fresh"
    pool.close()


async def test_a_failing_call_reports_its_own_error():
    pool = EnginePool("test-engine", 1)

    def refuse() -> None:
        raise ValueError("engine said no")

    with pytest.raises(ValueError, match="engine said no"):
        await pool.run(refuse, deadline=1)
    assert pool.busy == 0
    pool.close()


async def test_removals_are_retried_until_the_engine_confirms_and_only_then_reported(monkeypatch):
    monkeypatch.setattr(_reconciler, "RETRY_FIRST_S", 0.05)
    down = ApiError(503, "sandbox_runtime_unavailable", "no engine")
    attempts: list[tuple[str, str]] = []
    engine_up = False

    async def remove_one(kind: str, ref: str) -> None:
        attempts.append((kind, ref))
        if not engine_up:
            raise down

    confirmed: list[str] = []
    rec = Reconciler(remove_one)
    ok = await rec.remove([("container", "c1"), ("volume", "v1")], then=lambda: confirmed.append("s1"))
    assert ok is False and confirmed == []
    assert rec.pending() == [("container", "c1"), ("volume", "v1")]
    assert attempts == [("container", "c1")]  # the volume waits for its container: no second deadline
    await anyio.sleep(0.3)
    assert confirmed == [] and len(attempts) >= 2  # retried in the background, still failing
    engine_up = True
    with anyio.fail_after(5):
        while not confirmed:
            await anyio.sleep(0.02)
    assert confirmed == ["s1"] and rec.pending() == []
    assert attempts[-2:] == [("container", "c1"), ("volume", "v1")]
    await rec.close(budget_s=1)


async def test_an_engine_that_answers_again_wakes_the_reconciler_before_its_backoff(monkeypatch):
    monkeypatch.setattr(_reconciler, "RETRY_FIRST_S", 30.0)  # the timer alone would wait 30 s
    engine_up = False

    async def remove_one(kind: str, ref: str) -> None:
        if not engine_up:
            raise ApiError(503, "sandbox_runtime_unavailable", "no engine")

    confirmed: list[str] = []
    rec = Reconciler(remove_one)
    rec.defer([("volume", "v1")], then=lambda: confirmed.append("v1"))  # the engine was known to be down
    await anyio.sleep(0.1)
    engine_up = True
    rec.engine_answered()  # another engine call just succeeded
    with anyio.fail_after(2):
        while not confirmed:
            await anyio.sleep(0.02)
    await rec.close(budget_s=1)


async def test_what_is_still_pending_at_close_gets_one_last_round():
    gone: list[str] = []

    async def remove_one(kind: str, ref: str) -> None:
        if len(gone) == 0 and ref == "first-try":
            gone.append("refused")
            raise ApiError(502, "sandbox_engine_error", "volume in use")
        gone.append(ref)

    rec = Reconciler(remove_one)
    assert await rec.remove([("volume", "first-try")]) is False
    await rec.close(budget_s=1)
    assert gone == ["refused", "first-try"] and rec.pending() == []


async def test_leftovers_are_removed_each_on_its_own_and_deferred_once_the_engine_is_gone():
    tried: list[str] = []

    async def remove_one(kind: str, ref: str) -> None:
        tried.append(ref)
        if ref == "in-use":
            raise ApiError(502, "sandbox_engine_error", "volume is in use")
        if ref == "engine-dies-here":
            raise ApiError(503, "sandbox_runtime_unavailable", "no engine")

    rec = Reconciler(remove_one)
    done = await rec.remove_each([("volume", "in-use"), ("volume", "a"), ("volume", "engine-dies-here"),
                                  ("volume", "b"), ("volume", "c")])
    assert done == 1  # "a": a refusal of one object does not hold back the next
    assert tried == ["in-use", "a", "engine-dies-here"]  # after that, b and c wait for the engine
    assert sorted(ref for _, ref in rec.pending()) == ["b", "c", "engine-dies-here", "in-use"]
    await rec.close(budget_s=0.5)
