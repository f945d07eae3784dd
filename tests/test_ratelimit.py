"""Rate limiting (docs/http-security.md): exact limits, buckets, clients, headers, recovery, memory bounds."""

import asyncio
import bisect
import json
import random
import time
import tracemalloc

import pytest

from risoluto.hookspecs.ratelimit import client_group
from risoluto.plugins.http.rate_limit import MemoryLimiter

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def scope(ip):
    return {"client": (ip, 1234)}


def freeze(client):
    """Stop the limiter's clock: a burst through the test client then happens 'at once',
    in one sub-window, whatever the machine's speed."""
    kernel = client.app.extensions["risoluto"]
    clock = Clock(time.monotonic())
    kernel.backends.limiter.clock = clock
    return clock


async def hammer(client, n, path="/api/v1/runtime", ip="198.51.100.7", method="GET", **kw):
    out = []
    for _ in range(n):
        r = await client.open(path, method=method, scope_base=scope(ip), **kw)
        out.append(r)
    return out


# --- the algorithm, with a clock we control ------------------------------------------

@pytest.mark.parametrize("limit,window", [(300, 60), (600, 60), (1, 1), (7, 1.3), (1000, 0.7), (3, 3600)])
def test_exactly_limit_at_once_then_refused(limit, window):
    lim = MemoryLimiter(clock=Clock())
    decisions = [lim.decide("b", "1.2.3.4", limit, window) for _ in range(limit + 5)]
    assert all(d.allowed for d in decisions[:limit])
    assert not any(d.allowed for d in decisions[limit:])
    assert [d.remaining for d in decisions[:limit]] == list(range(limit - 1, -1, -1))


def test_no_double_burst_across_a_window_edge():
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    lim.decide("api", "other", 300, 60)  # the bucket's sub-windows start at 1000
    clock.t = 1059.9  # late in a would-be fixed window
    assert sum(lim.decide("api", "c", 300, 60).allowed for _ in range(300)) == 300
    clock.t = 1060.1  # just after the edge: a fixed window would allow 300 more here
    assert sum(lim.decide("api", "c", 300, 60).allowed for _ in range(300)) == 0
    clock.t = 1119.8  # still within 60 s of the burst: a GCRA would have refilled 299 by now
    assert sum(lim.decide("api", "c", 300, 60).allowed for _ in range(300)) == 0
    clock.t = 1120.0  # the burst's sub-window [1054, 1060) is 11 sub-windows old: all back
    assert sum(lim.decide("api", "c", 300, 60).allowed for _ in range(301)) == 300


def admitted_and_refused(limit, window, times):
    lim = MemoryLimiter(clock=(clock := Clock(times[0])))
    admitted, refused = [], []
    for t in times:
        clock.t = t
        decision = lim.decide("api", "c", limit, window)
        (admitted if decision.allowed else refused).append(t)
        if decision.allowed:  # counted: all admitted within the window, none older than 1.1 windows
            n = len(admitted)
            assert limit - (n - bisect.bisect_right(admitted, t - 1.1 * window)) <= decision.remaining
            assert decision.remaining <= limit - (n - bisect.bisect_left(admitted, t - window))
    return admitted, refused


def assert_never_over_the_limit(admitted, limit, window):
    """Every admitted timestamp against every later one: no interval of length ``window``
    (closed: both ends count) holds more than ``limit`` admitted requests."""
    for i, start in enumerate(admitted):
        inside = bisect.bisect_right(admitted, start + window) - i
        assert inside <= limit, f"{inside} admitted in [{start}, {start + window}] (limit {limit})"


@pytest.mark.parametrize("limit,window,seed", [(300, 60, 1), (10, 2, 2), (7, 1.3, 3), (1, 1, 4), (1000, 0.7, 5),
                                               (3, 3600, 6), (600, 60, 7)])
def test_no_window_ever_holds_more_than_the_limit_and_waits_are_at_most_10_percent_longer(limit, window, seed):
    """A client hammering with random gaps (bursts, pauses, the steady over-the-limit sender) for
    seven windows: no window-long interval admits more than ``limit``; every refusal happened with
    ``limit`` requests admitted within the last 1.1 windows (the most a client ever waits)."""
    rng = random.Random(seed)
    times, t = [], 1000.0
    while t < 1000.0 + 7 * window:
        times.append(t)
        if rng.random() < 1 / (4 * limit):  # now and then a pause, up to a third of a window
            t += rng.choice([window / limit * 2, window / 7, rng.random() * window / 3])
        else:  # mostly bursts and a rate above the limit
            t += rng.choice([0.0, window / limit / 4, window / limit / 2])
    admitted, refused = admitted_and_refused(limit, window, times)
    assert_never_over_the_limit(admitted, limit, window)
    for t in refused:
        assert bisect.bisect_right(admitted, t) - bisect.bisect_right(admitted, t - 1.1 * window) >= limit, t
    assert refused and len(admitted) >= limit * 3


def test_a_steady_sender_gets_the_limit_per_window_and_never_more():
    limit, window = 300, 60
    times = [1000 + i * 0.05 for i in range(int(7 * window / 0.05))]  # 20/s, four times the rate allowed
    admitted, _ = admitted_and_refused(limit, window, times)
    assert_never_over_the_limit(admitted, limit, window)
    assert admitted[:limit] == times[:limit]  # the first window: exactly the limit, at once
    assert times[limit] not in admitted
    assert limit * 7 / 1.1 - limit <= len(admitted) <= limit * 7


def test_refusal_headers_values():
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    first = lim.decide("api", "c", 300, 60)  # sub-windows of 6 s from 1000
    assert (first.allowed, first.limit, first.remaining) == (True, 300, 299)
    assert first.reset_seconds == pytest.approx(66)  # until this request's sub-window leaves the count
    for _ in range(99):
        lim.decide("api", "c", 300, 60)
    clock.t = 1010  # sub-window 1
    for _ in range(100):
        lim.decide("api", "c", 300, 60)
    clock.t = 1020  # sub-window 3
    for _ in range(100):
        last = lim.decide("api", "c", 300, 60)
    assert last.remaining == 0 and last.reset_seconds == pytest.approx(1084 - 1020)
    refused = lim.decide("api", "c", 300, 60)
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert refused.reset_seconds == pytest.approx(1066 - 1020)  # when sub-window 0's 100 leave
    clock.t = 1065.9
    assert not lim.decide("api", "c", 300, 60).allowed
    clock.t = 1066
    assert sum(lim.decide("api", "c", 300, 60).allowed for _ in range(101)) == 100
    refused = lim.decide("api", "c", 300, 60)
    assert refused.reset_seconds == pytest.approx(1072 - 1066)  # then sub-window 1's


def test_refused_requests_do_not_push_the_client_further_out():
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    for _ in range(10):
        lim.decide("b", "c", 10, 10)
    for _ in range(1000):
        assert not lim.decide("b", "c", 10, 10).allowed
    clock.t += 11.0
    assert sum(lim.decide("b", "c", 10, 10).allowed for _ in range(11)) == 10


def test_buckets_and_clients_are_separate_ipv6_grouped_by_64():
    lim = MemoryLimiter(clock=Clock())
    for _ in range(3):
        lim.decide("api", "2001:db8:1:2::1", 3, 60)
    assert not lim.decide("api", "2001:db8:1:2:ffff::9", 3, 60).allowed  # same /64
    assert lim.decide("api", "2001:db8:1:3::1", 3, 60).allowed  # next /64
    assert lim.decide("webhooks", "2001:db8:1:2::1", 3, 60).allowed  # other bucket
    assert lim.decide("api", "10.0.0.1", 3, 60).allowed
    assert client_group("::ffff:10.0.0.1") == "10.0.0.1"


def test_a_change_of_limits_keeps_what_clients_used():
    """Tightening the limit (e.g. through the overlay) must not hand every client a fresh budget."""
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    assert sum(lim.decide("api", "c", 300, 60).allowed for _ in range(250)) == 250
    clock.t += 10
    assert sum(lim.decide("api", "c", 400, 120).allowed for _ in range(200)) == 150  # 250 of 400 used
    assert sum(lim.decide("api", "d", 400, 120).allowed for _ in range(100)) == 100
    clock.t += 10
    assert sum(lim.decide("api", "c", 200, 60).allowed for _ in range(10)) == 0  # 400 used > 200
    assert sum(lim.decide("api", "d", 200, 60).allowed for _ in range(200)) == 100
    assert lim.decide("api", "other", 200, 60).allowed


def test_every_loopback_address_is_one_client():
    lim = MemoryLimiter(clock=Clock())
    for client in ("127.0.0.1", "127.0.0.2", "::1"):
        assert lim.decide("api", client, 4, 60).allowed
    assert lim.decide("api", "::ffff:127.45.6.7", 4, 60).allowed
    for client in ("127.0.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.1"):
        assert not lim.decide("api", client, 4, 60).allowed, client
    assert lim.decide("api", "10.0.0.1", 4, 60).allowed  # nobody else
    assert lim.tracked() == 2


def test_idle_clients_expire_exactly():
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    for i in range(1000):
        lim.decide("api", f"10.0.{i // 256}.{i % 256}", 300, 60)
    busy = [lim.decide("api", "10.9.9.9", 300, 60) for _ in range(300)]
    assert busy[-1].allowed and lim.tracked() == 1001
    clock.t += 61
    lim.decide("api", "192.0.2.1", 300, 60)
    assert lim.tracked() == 1002  # moved to the previous generation, still there
    assert not lim.decide("api", "10.9.9.9", 300, 60).allowed  # its burst still counts: state kept
    clock.t += 60
    lim.decide("api", "192.0.2.1", 300, 60)
    assert lim.tracked() == 2  # the probe and 10.9.9.9 (seen since); the 1000 idle ones are gone
    clock.t += 121
    lim.decide("api", "192.0.2.2", 300, 60)
    assert lim.tracked() == 1  # everything idle for two windows is gone


def test_idle_clients_memory_is_given_back():
    clock = Clock()
    lim = MemoryLimiter(clock=clock)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(20000):
            lim.decide("api", f"10.1.{i // 256}.{i % 256}", 300, 60)
        full = tracemalloc.get_traced_memory()[0] - base
        clock.t += 121
        lim.decide("api", "192.0.2.1", 300, 60)
        after = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert full > 20000 * 50
    assert after < full / 20


def test_tracked_clients_are_bounded():
    clock = Clock()
    lim = MemoryLimiter(max_clients=1000, clock=clock)
    for i in range(20000):
        clock.t += 0.001
        lim.decide("api" if i % 2 else "webhooks", f"2001:db8:{i:x}::1", 300, 60)
        assert lim.tracked() <= 1000
    assert lim.evicted >= 19000


# --- through the app ----------------------------------------------------------------------

async def test_api_bucket_301st_request_is_refused(risoluto_client):
    client = await risoluto_client()
    freeze(client)
    responses = await hammer(client, 301)
    assert [r.status_code for r in responses[:300]] == [200] * 300
    assert [int(r.headers["RateLimit-Remaining"]) for r in responses[:300]] == list(range(299, -1, -1))
    assert {r.headers["RateLimit-Limit"] for r in responses} == {"300"}
    # the burst's sub-window leaves the count 66 s later (sub-windows of 6 s from the first request)
    assert {r.headers["RateLimit-Reset"] for r in responses[:300]} == {"66"}
    refused = responses[300]
    assert refused.status_code == 429
    assert json.loads(await refused.get_data())["error"]["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == "66"
    assert refused.headers["RateLimit-Remaining"] == "0"
    # /metrics counts in the same bucket
    metrics = (await hammer(client, 1, path="/metrics"))[0]
    assert metrics.status_code == 429


async def test_webhooks_bucket_is_600_and_separate(risoluto_client):
    client = await risoluto_client()
    clock = freeze(client)
    await hammer(client, 300)
    assert (await hammer(client, 1))[0].status_code == 429
    responses = await hammer(client, 601, path="/webhooks/linear", method="POST", data=b"{}")
    # unconfigured webhook: 503 each time, but every one counts
    assert [r.status_code for r in responses[:600]] == [503] * 600
    assert responses[0].headers["RateLimit-Limit"] == "600"
    assert responses[600].status_code == 429
    # another client is untouched in both buckets
    assert (await hammer(client, 1, ip="198.51.100.8"))[0].status_code == 200
    assert (await hammer(client, 1, ip="198.51.100.8", path="/webhooks/github", method="POST"))[0].status_code == 503
    clock.t += 65.9  # the api burst still counts
    assert [r.status_code for r in await hammer(client, 1)] == [429]
    clock.t += 0.1  # its sub-window has left the count: the whole limit is back
    assert [r.status_code for r in await hammer(client, 301)] == [200] * 300 + [429]


@pytest.mark.parametrize("path", ["/API/v1/runtime", "/api//v1/runtime", "/api/v1/runtime/", "/metrics/",
                                  "/api/v1/nope", "/METRICS"])
async def test_path_variants_share_the_api_bucket(risoluto_client, path):
    client = await risoluto_client(config={"rateLimit": {"api": {"limit": 3, "windowSeconds": 60}}})
    freeze(client)
    await hammer(client, 3)
    response = (await hammer(client, 1, path=path))[0]
    assert response.status_code == 429, path


async def test_paths_outside_the_buckets_are_not_limited(risoluto_client):
    client = await risoluto_client(config={"rateLimit": {"api": {"limit": 1, "windowSeconds": 60}}})
    responses = await hammer(client, 5, path="/nowhere")
    assert {r.status_code for r in responses} == {404}
    assert "RateLimit-Limit" not in responses[0].headers


async def test_flood_of_bad_tokens_is_throttled_before_auth(risoluto_client):
    env = {"RISOLUTO_WRITE_TOKEN": "t" * 32}
    client = await risoluto_client(env=env, config={"rateLimit": {"api": {"limit": 20, "windowSeconds": 60}}})
    freeze(client)
    responses = await hammer(client, 25, path="/api/v1/config/overlay", method="PUT",
                             headers={"Authorization": "Bearer wrong"}, json={})
    assert [r.status_code for r in responses] == [401] * 20 + [429] * 5


async def test_recovery_after_the_window(risoluto_client):
    client = await risoluto_client(config={"rateLimit": {"api": {"limit": 5, "windowSeconds": 1}}})
    first = await hammer(client, 6)
    assert [r.status_code for r in first] == [200] * 5 + [429]
    assert first[5].headers["Retry-After"] in ("1", "2")  # at most 1.1 s, rounded up
    await asyncio.sleep(1.15)
    again = await hammer(client, 6)
    assert [r.status_code for r in again] == [200] * 5 + [429]


async def test_spoofed_forwarded_for_does_not_buy_a_new_bucket(risoluto_client):
    client = await risoluto_client(config={"rateLimit": {"api": {"limit": 3, "windowSeconds": 60}}})
    freeze(client)
    codes = []
    for i in range(5):
        r = await client.get("/api/v1/runtime", headers={"X-Forwarded-For": f"203.0.113.{i}"},
                             scope_base=scope("198.51.100.50"))
        codes.append(r.status_code)
    assert codes == [200, 200, 200, 429, 429]


async def test_trusted_proxy_clients_get_their_own_buckets(risoluto_client):
    client = await risoluto_client(env={"RISOLUTO_TRUSTED_PROXIES": "10.9.0.0/16"},
                                   config={"rateLimit": {"api": {"limit": 2, "windowSeconds": 60}}})
    freeze(client)
    codes = {}
    for ip in ("203.0.113.1", "203.0.113.2"):
        codes[ip] = [
            (await client.get("/api/v1/runtime", headers={"X-Forwarded-For": ip},
                              scope_base=scope("10.9.0.1"))).status_code
            for _ in range(3)
        ]
    assert codes == {"203.0.113.1": [200, 200, 429], "203.0.113.2": [200, 200, 429]}


async def test_unknown_backend_stops_startup(risoluto_settings):
    from risoluto.app import create_app
    from risoluto.errors import StartupError

    app = create_app(risoluto_settings(config={"rateLimit": {"backend": "carrier-pigeon"}}))
    with pytest.raises((StartupError, Exception), match="carrier-pigeon"):
        async with app.test_app():
            pass


def test_doctor(risoluto_settings):
    from risoluto.kernel import Kernel
    from risoluto.plugins.http import rate_limit

    cases = [({}, "PASS"), ({"rateLimit": {"api": {"limit": 1000}}}, "WARN"),
             ({"rateLimit": {"webhooks": {"limit": 600, "windowSeconds": 1}}}, "WARN"),
             ({"rateLimit": {"failOpen": True}}, "WARN"), ({"rateLimit": {"backend": "nope"}}, "FAIL")]
    for config, status in cases:
        (result,) = rate_limit.risoluto_doctor_checks(Kernel(risoluto_settings(config=config)))
        assert result.status == status, (config, result)


def test_decision_speed_sanity():
    lim = MemoryLimiter()
    start = time.perf_counter()
    for i in range(100_000):
        lim.decide("api", f"10.0.{(i >> 8) & 255}.{i & 255}", 300, 60)
    assert time.perf_counter() - start < 2.0
