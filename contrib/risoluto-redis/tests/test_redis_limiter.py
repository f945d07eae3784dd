"""risoluto-redis against a real Redis: several kernel instances enforce one limit together.

Everything goes through the public surface: the plugin is found through its installed entry
point, selected by ``rateLimit.backend: redis``, and exercised with HTTP requests to real
apps (in-process and ``risoluto serve`` processes); Redis is inspected with its own client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import anyio
import httpx
import pytest
import redis

from risoluto.app import kernel_of
from risoluto.hookspecs.ratelimit import client_group
from risoluto.settings import build_settings
from risoluto.testing import running_app
from risoluto_redis.limiter import WINDOW_LUA, RedisLimiter

pytestmark = pytest.mark.anyio


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(tmp_path, name, limit=10, window=60, **rate_limit):
    config = {"rateLimit": {"backend": "redis", "api": {"limit": limit, "windowSeconds": window}, **rate_limit}}
    return build_settings(config, None, {"DATA_DIR": str(tmp_path / name)})


def remote(ip):
    return {"client": (ip, 40000)}


async def get(client, ip="198.51.100.7", path="/api/v1/runtime"):
    return await client.get(path, scope_base=remote(ip))


# -- discovery and selection ------------------------------------------------------------------


def test_found_through_its_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "risoluto.cli", "plugins", "--json"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "DATA_DIR": str(tmp_path)})
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["redis"]["source"] == "entry point"
    assert rows["redis"]["distribution"] == "risoluto-redis"
    assert set(rows["redis"]["hooks"]) == {"risoluto_ratelimit_backend", "risoluto_doctor_checks",
                                          "risoluto_settings_validate"}


async def test_selected_by_configuration_only(tmp_path, redis_env):
    async with running_app(settings_for(tmp_path, "r")) as app:
        assert isinstance(kernel_of(app.app).backends.limiter, RedisLimiter)
    memory = build_settings({}, None, {"DATA_DIR": str(tmp_path / "m")})
    async with running_app(memory) as app:
        assert not isinstance(kernel_of(app.app).backends.limiter, RedisLimiter)


# -- shared limits ----------------------------------------------------------------------------


async def test_two_instances_share_one_limit(tmp_path, redis_env):
    async with running_app(settings_for(tmp_path, "a")) as a, running_app(settings_for(tmp_path, "b")) as b:
        ca, cb = a.test_client(), b.test_client()
        remaining = []
        for _ in range(6):
            r = await get(ca)
            assert r.status_code == 200
            remaining.append(int(r.headers["RateLimit-Remaining"]))
        for _ in range(4):
            r = await get(cb)
            assert r.status_code == 200
            remaining.append(int(r.headers["RateLimit-Remaining"]))
        assert remaining == list(range(9, -1, -1))  # one counter, whichever instance answered
        refused = await get(cb)  # the 11th request, 5th to B
        assert refused.status_code == 429
        assert (await refused.get_json())["error"]["code"] == "rate_limited"
        # when the burst's sub-window (6 s long) leaves the count: between 1 and 1.1 windows later
        assert 60 < int(refused.headers["Retry-After"]) <= 66
        assert refused.headers["RateLimit-Limit"] == "10" and refused.headers["RateLimit-Remaining"] == "0"
        assert (await get(ca)).status_code == 429  # and A agrees
        assert (await get(ca, ip="198.51.100.8")).status_code == 200  # another client has its own budget


async def test_ipv6_clients_are_grouped_by_64(tmp_path, redis_env):
    async with running_app(settings_for(tmp_path, "a", limit=3)) as a, \
            running_app(settings_for(tmp_path, "b", limit=3)) as b:
        ca, cb = a.test_client(), b.test_client()
        assert (await get(ca, "2001:db8:1:2::1")).status_code == 200
        assert (await get(cb, "2001:db8:1:2::ffff")).status_code == 200
        assert (await get(ca, "2001:db8:1:2:aaaa::9")).status_code == 200
        assert (await get(cb, "2001:db8:1:2::77")).status_code == 429  # same /64: one client
        assert (await get(cb, "2001:db8:1:3::1")).status_code == 200  # next /64: another client
    keys = redis.Redis.from_url(redis_env["url"]).keys(redis_env["prefix"] + "*")
    assert sorted(k.decode() for k in keys) == sorted(
        redis_env["prefix"] + "api:" + client_group(ip) for ip in ("2001:db8:1:2::1", "2001:db8:1:3::1"))


def _serve(tmp_path, name, port, env):
    data = tmp_path / name
    config = tmp_path / "config.yaml"
    config.write_text("rateLimit:\n  backend: redis\n  api:\n    limit: 10\n    windowSeconds: 60\n")
    full = {k: v for k, v in os.environ.items() if k not in ("MASTER_KEY", "RISOLUTO_WRITE_TOKEN")}
    full.update(env, DATA_DIR=str(data), RISOLUTO_PORT=str(port), RISOLUTO_CONFIG=str(config))
    return subprocess.Popen([sys.executable, "-m", "risoluto.cli", "serve"], env=full, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_up(port, proc):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"risoluto serve exited: {proc.stderr.read()}")
        try:
            # /openapi.json is rate-limited too; probe with a path outside every bucket
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("risoluto serve did not answer")


def test_two_serve_processes_share_one_limit(tmp_path, redis_env):
    env = {"RISOLUTO_REDIS_URL": redis_env["url"], "RISOLUTO_REDIS_PREFIX": redis_env["prefix"]}
    ports = free_port(), free_port()
    procs = [_serve(tmp_path, f"d{i}", port, env) for i, port in enumerate(ports)]
    try:
        for port, proc in zip(ports, procs, strict=True):
            _wait_up(port, proc)
        a, b = (f"http://127.0.0.1:{p}/api/v1/runtime" for p in ports)
        statuses = [httpx.get(a, timeout=5).status_code for _ in range(6)]
        statuses += [httpx.get(b, timeout=5).status_code for _ in range(5)]
        assert statuses == [200] * 10 + [429]
        assert httpx.get(a, timeout=5).status_code == 429
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(20)


# -- the algorithm, atomicity, expiry ---------------------------------------------------------


async def test_decisions_are_atomic_across_instances(redis_env):
    limiters = [RedisLimiter(redis_env["url"], redis_env["prefix"]) for _ in range(2)]
    results = []

    async def one(limiter):
        results.append((await limiter.hit("api", "192.0.2.1", 25, 60)).allowed)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(80):
                tg.start_soon(one, limiters[i % 2])
    finally:
        for limiter in limiters:
            await limiter.close()
    assert results.count(True) == 25 and len(results) == 80


async def test_no_double_burst_across_a_window_edge(redis_env):
    limiter = RedisLimiter(redis_env["url"], redis_env["prefix"])
    try:
        start = time.monotonic()
        first = [await limiter.hit("api", "192.0.2.2", 10, 1.0) for _ in range(15)]
        assert [d.allowed for d in first] == [True] * 10 + [False] * 5
        assert [d.remaining for d in first[:10]] == list(range(9, -1, -1))
        await anyio.sleep(0.5)
        # a fixed window would allow 10 more after its edge, a GCRA the 5 that have refilled: here none
        second = [(await limiter.hit("api", "192.0.2.2", 10, 1.0)).allowed for _ in range(15)]
        assert second.count(True) == 0 or time.monotonic() - start > 1.0
        # the burst leaves the count at most 1.1 windows later: then the whole limit is back
        await anyio.sleep(max(0.0, start + 1.15 - time.monotonic()))
        third = [(await limiter.hit("api", "192.0.2.2", 10, 1.0)).allowed for _ in range(15)]
        assert third == [True] * 10 + [False] * 5
    finally:
        await limiter.close()


async def test_no_interval_of_one_window_admits_more_than_the_limit_across_instances(redis_env):
    """Two instances, one client sending steadily at three times the rate for seven windows.
    Timestamps bracket the server's decision, so only a real breach can fail this."""
    limit, window = 8, 1.0
    limiters = [RedisLimiter(redis_env["url"], redis_env["prefix"]) for _ in range(2)]
    admitted, refused = [], []
    try:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 7 * window:
            sent = time.monotonic()
            decision = await limiters[i % 2].hit("api", "192.0.2.9", limit, window)
            (admitted if decision.allowed else refused).append((sent, time.monotonic()))
            i += 1
            await anyio.sleep(max(0.0, start + i * window / limit / 3 - time.monotonic()))
    finally:
        for limiter in limiters:
            await limiter.close()
    for j in range(len(admitted) - limit):
        assert admitted[j + limit][1] - admitted[j][0] > window, j
    for sent, answered in refused:
        assert sum(1 for s, a in admitted if a > sent - 1.1 * window and s <= answered) >= limit
    assert len(admitted) >= limit * 5


async def test_keys_expire_when_they_carry_no_information(redis_env):
    limiter = RedisLimiter(redis_env["url"], redis_env["prefix"])
    raw = redis.Redis.from_url(redis_env["url"])
    key = limiter.key("api", "192.0.2.3")
    try:
        decisions = [await limiter.hit("api", "192.0.2.3", 4, 0.4) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True] * 4 + [False]
        assert 0 < raw.pttl(key) <= 440  # never longer than 1.1 windows
        await anyio.sleep(0.5)
        assert raw.exists(key) == 0  # forgotten...
        again = await limiter.hit("api", "192.0.2.3", 4, 0.4)
        assert again.allowed and again.remaining == 3  # ...exactly as a new client
        assert 0 < raw.pttl(key) <= 440
        assert raw.hlen(key) == 1
    finally:
        raw.close()
        await limiter.close()


async def test_a_key_left_by_the_gcra_version_is_replaced(redis_env):
    limiter = RedisLimiter(redis_env["url"], redis_env["prefix"])
    raw = redis.Redis.from_url(redis_env["url"])
    key = limiter.key("api", "192.0.2.5")
    try:
        raw.set(key, "1765000000000000.5", px=60000)  # the old format: a TAT string
        decision = await limiter.hit("api", "192.0.2.5", 3, 60)
        assert decision.allowed and decision.remaining == 2
        assert raw.type(key) == b"hash"
    finally:
        raw.close()
        await limiter.close()


async def test_script_cache_flush_is_survived(private_redis):
    limiter = RedisLimiter(private_redis.url)
    raw = redis.Redis.from_url(private_redis.url)
    try:
        assert (await limiter.hit("api", "192.0.2.4", 5, 60)).allowed
        sha = limiter.sha
        raw.script_flush()
        assert raw.script_exists(sha) == [False]
        decision = await limiter.hit("api", "192.0.2.4", 5, 60)
        assert decision.allowed and decision.remaining == 3  # state kept, script reloaded
        assert raw.script_exists(sha) == [True]
    finally:
        raw.close()
        await limiter.close()


def test_script_is_one_atomic_lua_script():
    # every read and write of a decision happens inside the script: no client-side read-modify-write
    assert "'HGETALL'" in WINDOW_LUA and "redis.call('HINCRBY'" in WINDOW_LUA and "'PEXPIRE'" in WINDOW_LUA


# -- failures ---------------------------------------------------------------------------------


async def _overlay_put(client, ip="127.0.0.1"):
    return await client.put("/api/v1/config/overlay", json={"rateLimit": {}}, scope_base=remote(ip))


async def test_unreachable_redis_fails_closed(tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv("RISOLUTO_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    async with running_app(settings_for(tmp_path, "a")) as app:
        client = app.test_client()
        for response in (await get(client), await _overlay_put(client)):
            assert response.status_code == 503
            assert (await response.get_json())["error"]["code"] == "rate_limiter_unavailable"
        assert (await client.get("/no-such-page", scope_base=remote("198.51.100.7"))).status_code == 404  # unlimited


async def test_unreachable_redis_fail_open_lets_reads_through_only(tmp_path, monkeypatch, redis_url):
    monkeypatch.setenv("RISOLUTO_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    async with running_app(settings_for(tmp_path, "a", failOpen=True)) as app:
        client = app.test_client()
        assert (await get(client)).status_code == 200
        refused = await _overlay_put(client)
        assert refused.status_code == 503
        assert (await refused.get_json())["error"]["code"] == "rate_limiter_unavailable"


async def test_a_failing_batch_fails_every_decision_in_it(redis_url):
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0")
    outcomes = []

    async def one(i):
        try:
            await limiter.hit("api", f"192.0.2.{i}", 10, 60)
            outcomes.append("allowed")
        except Exception as exc:  # what the kernel turns into 503
            outcomes.append(type(exc).__name__)

    try:
        with anyio.fail_after(10):  # nobody is left waiting forever
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
    finally:
        await limiter.close()
    assert len(outcomes) == 50 and "allowed" not in outcomes


async def test_redis_going_away_and_coming_back(tmp_path, monkeypatch, private_redis):
    monkeypatch.setenv("RISOLUTO_REDIS_URL", private_redis.url)
    async with running_app(settings_for(tmp_path, "a")) as app:
        client = app.test_client()
        assert (await get(client)).status_code == 200
        private_redis.stop()
        started = time.monotonic()
        down = await get(client)
        assert down.status_code == 503 and time.monotonic() - started < 5  # fails fast, not after minutes
        private_redis.start()  # same port
        assert (await get(client)).status_code == 200


def test_doctor_reports_reachability(tmp_path, redis_url):
    config = tmp_path / "config.yaml"
    config.write_text("rateLimit:\n  backend: redis\n")

    def doctor(url):
        env = {**os.environ, "DATA_DIR": str(tmp_path / "d"), "RISOLUTO_CONFIG": str(config),
               "RISOLUTO_REDIS_URL": url}
        result = subprocess.run([sys.executable, "-m", "risoluto.cli", "doctor", "--json"], capture_output=True,
                                text=True, timeout=60, env=env)
        item = next(i for i in json.loads(result.stdout)["items"] if i["item"] == "Rate limiting: Redis backend")
        return item, result.returncode

    item, _ = doctor(redis_url)
    assert item["status"] == "PASS" and "reachable" in item["reason"]
    item, rc = doctor(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert item["status"] == "FAIL" and rc == 1
    assert "unreachable" in item["reason"] and "hunter2" not in json.dumps(item)


def test_configured_from_the_config_file_and_overridden_by_the_environment(tmp_path, redis_url):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"rateLimit": {"backend": "redis"},
                                  "plugins": {"settings": {"redis": {"url": redis_url, "prefix": "t:file:"}}}}))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RISOLUTO_REDIS")}
    base.update(DATA_DIR=str(tmp_path / "d"), RISOLUTO_CONFIG=str(config))

    def item(**env):
        result = subprocess.run([sys.executable, "-m", "risoluto.cli", "doctor", "--json"], capture_output=True,
                                text=True, timeout=60, env={**base, **env})
        return next(i for i in json.loads(result.stdout)["items"] if i["item"] == "Rate limiting: Redis backend")

    assert item()["status"] == "PASS"  # the file alone is enough
    assert item(RISOLUTO_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")["status"] == "FAIL"


@pytest.mark.parametrize("section, message", [
    ({"url": "http://x"}, "plugins.settings.redis.url: must be a redis://"),
    ({"colour": "red"}, "plugins.settings.redis.colour: unknown key"),
    ({"prefix": ""}, "plugins.settings.redis.prefix: expected a non-empty string"),
])
def test_bad_settings_stop_startup_naming_the_key(tmp_path, section, message):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"plugins": {"settings": {"redis": section}}}))
    result = subprocess.run([sys.executable, "-m", "risoluto.cli", "config", "check"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "DATA_DIR": str(tmp_path / "d"), "RISOLUTO_CONFIG": str(config)})
    assert result.returncode != 0 and message in result.stderr
