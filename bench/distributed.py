"""The shared backends of contrib/: Redis rate-limit decisions/s and PostgreSQL secret set latency.

Redis: ``risoluto_redis.RedisLimiter.hit`` (one EVALSHA returning allowed/remaining/reset)
against the ``limits`` library's async Redis storage (same driver, redis-py's asyncio client)
with its moving-window and sliding-window-counter strategies, on the same server, same
concurrency, same client mix, rounds interleaved. ``limits``' ``hit`` answers only yes/no;
the kernel also needs remaining/reset for its headers, which costs ``limits`` a second call
(``get_window_stats``), shown as its own line. Target: >= 1x the best ``limits`` ``hit``.

PostgreSQL: ``risoluto_postgres.PostgresStore.set`` (AES-GCM + key-check + upsert, durable)
against a bare ``INSERT ... ON CONFLICT DO UPDATE`` + ``commit()`` on the same driver (psycopg 3
async), same server, same row shape, interleaved op by op. Target: <= 1.5x.

    .venv/bin/python bench/distributed.py [--quick]

Needs the servers of scripts/provision-services (RISOLUTO_REDIS_URL, RISOLUTO_POSTGRES_DSN).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
# keep bench/ itself off sys.path: scripts here must never shadow a library module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
for contrib in ("risoluto-redis", "risoluto-postgres"):
    sys.path.insert(0, str(ROOT / "contrib" / contrib))

import psycopg  # noqa: E402
import redis  # noqa: E402
from limits import parse  # noqa: E402
from limits.aio.storage import RedisStorage  # noqa: E402
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from bench._servers import stats  # noqa: E402
from risoluto_postgres.store import PostgresStore  # noqa: E402
from risoluto_redis.limiter import RedisLimiter  # noqa: E402

REDIS_URL = os.environ.get("RISOLUTO_REDIS_URL") or "redis://127.0.0.1:6379/0"
PG_DSN = os.environ.get("RISOLUTO_POSTGRES_DSN") or "postgresql://risoluto:risoluto@127.0.0.1:5432/risoluto"
CLIENTS = [f"10.{i // 250}.{i % 250}.7" for i in range(2000)]  # distinct clients, round-robin
LIMIT, WINDOW = 300, 60


# -- Redis ------------------------------------------------------------------------------------


async def rate(fn, ops: int, concurrency: int) -> float:
    """Decisions per second: ``ops`` calls spread over ``concurrency`` tasks."""
    per_task = ops // concurrency

    async def worker(offset: int) -> None:
        for i in range(per_task):
            await fn(CLIENTS[(offset + i * concurrency) % len(CLIENTS)])

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for w in range(concurrency):
            tg.start_soon(worker, w)
    return per_task * concurrency / (time.perf_counter() - t0)


async def bench_redis(ops: int, rounds: int, concurrency: int) -> None:
    tag = f"risoluto-bench-{os.getpid()}"
    ours = RedisLimiter(REDIS_URL, f"{tag}:ours:")
    storage = RedisStorage("async+" + REDIS_URL, implementation="redispy", key_prefix=f"{tag}:limits")
    moving, sliding = MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage)
    item = parse(f"{LIMIT}/{WINDOW} seconds")

    async def risoluto(client: str) -> None:
        await ours.hit("api", client, LIMIT, WINDOW)

    async def limits_moving(client: str) -> None:
        await moving.hit(item, "api", client)

    async def limits_sliding(client: str) -> None:
        await sliding.hit(item, "api", client)

    async def limits_sliding_stats(client: str) -> None:  # what the kernel's headers would need
        await sliding.hit(item, "api", client)
        await sliding.get_window_stats(item, "api", client)

    cases = {"risoluto-redis hit (sub-window counters, 1 script)": risoluto, "limits moving window hit": limits_moving,
             "limits sliding window counter hit": limits_sliding,
             "limits sliding window hit + window stats": limits_sliding_stats}
    for fn in cases.values():  # warm-up: connections, script cache
        await rate(fn, concurrency * 20, concurrency)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            results[name].append(await rate(fn, ops, concurrency))
    single = {name: await rate(cases[name], ops // 4, 1) for name in
              ("risoluto-redis hit (sub-window counters, 1 script)", "limits sliding window counter hit")}
    await ours.close()
    raw = redis.Redis.from_url(REDIS_URL)
    for key in raw.scan_iter(f"{tag}*", count=1000):
        raw.delete(key)
    raw.close()

    best = {name: max(v) for name, v in results.items()}
    print(f"Redis {REDIS_URL}: {ops} decisions x {rounds} rounds, concurrency {concurrency}, "
          f"{len(CLIENTS)} clients, limit {LIMIT}/{WINDOW}s (best round, decisions/s)")
    for name, value in best.items():
        print(f"  {name:<44} {value:>10,.0f}/s")
    ours_best = best["risoluto-redis hit (sub-window counters, 1 script)"]
    baseline = max(best["limits moving window hit"], best["limits sliding window counter hit"])
    print(f"  ratio risoluto-redis / best limits hit         {ours_best / baseline:>10.2f}x  (target >= 1x)")
    print(f"  ratio risoluto-redis / limits hit + stats      "
          f"{ours_best / best['limits sliding window hit + window stats']:>10.2f}x")
    print("  one request at a time (concurrency 1: nothing to batch):")
    for name, value in single.items():
        print(f"  {name:<44} {value:>10,.0f}/s")
    values = list(single.values())
    print(f"  ratio at concurrency 1                         {values[0] / values[1]:>10.2f}x")


# -- PostgreSQL -------------------------------------------------------------------------------


async def bench_postgres(ops: int, size: int) -> None:
    schema = f"risoluto_bench_{os.getpid()}"
    admin = await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True)
    await admin.execute(f"CREATE SCHEMA {schema}")
    dsn = make_conninfo(PG_DSN, options=f"-c search_path={schema}")
    try:
        store = PostgresStore(dsn, "bench master key")
        await store.open()
        await store.set_many({f"SECRET_{i:06}": "v" * 40 for i in range(size)})
        bare = await psycopg.AsyncConnection.connect(dsn)  # default: a transaction per commit()
        await bare.execute("CREATE TABLE bare (key TEXT PRIMARY KEY, ciphertext TEXT, iv TEXT, auth_tag TEXT, "
                           "updated_at TEXT)")
        await bare.commit()
        upsert = ("INSERT INTO bare VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET "
                  "ciphertext = excluded.ciphertext, iv = excluded.iv, auth_tag = excluded.auth_tag, "
                  "updated_at = excluded.updated_at")
        sets, bares = [], []
        for i in range(ops):
            name = f"SECRET_{i % size:06}"
            t0 = time.perf_counter()
            await store.set(name, "v" * 40)
            sets.append(time.perf_counter() - t0)
            row = (name, base64.b64encode(os.urandom(40)).decode(), base64.b64encode(os.urandom(12)).decode(),
                   base64.b64encode(os.urandom(16)).decode(), "2024-01-01T00:00:00.000Z")
            t0 = time.perf_counter()
            await bare.execute(upsert, row)
            await bare.commit()
            bares.append(time.perf_counter() - t0)
        await store.close()
        await bare.close()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    s, b = stats(sets), stats(bares)
    print(f"PostgreSQL: {ops} sets over {size} secrets, interleaved with the baseline (latency, µs)")
    for name, st in (("risoluto-postgres set", s), ("bare INSERT ON CONFLICT + commit", b)):
        print(f"  {name:<44} p50 {st['p50']:>8.0f}  mean {st['mean']:>8.0f}  p90 {st['p90']:>8.0f}")
    print(f"  ratio set / bare (p50)                       {s['p50'] / b['p50']:>10.2f}x  (target <= 1.5x)")
    print(f"  ratio set / bare (mean)                      {s['mean'] / b['mean']:>10.2f}x")


def reachable() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        return f"Redis at {REDIS_URL}: {exc}"
    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL: {str(exc).splitlines()[0]}"
    return None


async def main(quick: bool) -> None:
    await bench_redis(ops=4000 if quick else 20000, rounds=2 if quick else 3, concurrency=32)
    print()
    await bench_postgres(ops=300 if quick else 2000, size=1000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations (a smoke run)")
    args = parser.parse_args()
    problem = reachable()
    if problem:
        sys.exit(f"bench/distributed.py: {problem}. Run scripts/provision-services as root first.")
    anyio.run(main, args.quick)
