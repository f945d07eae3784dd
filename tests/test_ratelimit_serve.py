"""Rate limits on a real ``risoluto serve`` (docs/http-security.md, "Rate limiting"), seen
from the client's side: every loopback address is one client, and a client sending steadily
for seven windows never gets more than the limit through in any window-long interval.

Client-side timestamps bracket the server's decision (sent before, answered after), so the
checks below can only fail on a real violation: N admitted requests whose span, even measured
from the first one's send to the last one's answer, fits in one window."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from http_support import free_port
from serve_util import RISOLUTO, operator_env, spawn, stop, wait_answering

LIMIT = 10
WINDOW = 2.0


@pytest.fixture
def serve(tmp_path):
    started = []

    def start(limit: int, window: float) -> tuple[str, object]:
        (tmp_path / "config.yaml").write_text(
            f"rateLimit:\n  api:\n    limit: {limit}\n    windowSeconds: {window}\n")
        port = free_port()
        env = operator_env(DATA_DIR=str(tmp_path / "data"), RISOLUTO_PORT=str(port),
                           RISOLUTO_CONFIG=str(tmp_path / "config.yaml"))
        proc = spawn([*RISOLUTO, "serve"], env, cwd=tmp_path)
        started.append(proc)
        # wait on a path outside the api bucket: the probe must not spend the limit
        assert wait_answering(proc, f"http://127.0.0.1:{port}/nowhere") is not None, proc.stderr.read()
        return f"http://127.0.0.1:{port}", tmp_path / "data"

    yield start
    for proc in started:
        stop(proc)


def client_from(source: str) -> httpx.Client:
    """An HTTP client whose connections leave from ``source`` (any 127.x address works on Linux)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10)


def test_127_0_0_2_shares_the_bucket_of_127_0_0_1(serve):
    base, data = serve(5, 60)
    with client_from("127.0.0.1") as one, client_from("127.0.0.2") as two, client_from("127.0.0.3") as three:
        codes = [one.get(f"{base}/api/v1/runtime").status_code for _ in range(3)]
        codes += [two.get(f"{base}/api/v1/runtime").status_code for _ in range(2)]
        assert codes == [200] * 5
        refused = two.get(f"{base}/api/v1/runtime")
        assert refused.status_code == 429 and refused.headers["RateLimit-Remaining"] == "0"
        assert three.get(f"{base}/api/v1/runtime").status_code == 429
        assert one.get(f"{base}/api/v1/runtime").status_code == 429
        # auditing: a write from 127.0.0.2 is recorded as the one loopback client
        write = two.put(f"{base}/nowhere", json={}, headers={"X-Request-ID": "from-127-0-0-2"})
        assert write.status_code == 404
    records = [json.loads(line) for line in (data / "write-audit.log").read_text().splitlines()]
    assert [r["remote"] for r in records if r["request_id"] == "from-127-0-0-2"] == ["127.0.0.1"]


def test_a_steady_client_never_exceeds_the_limit_in_any_window(serve):
    """Four times the allowed rate, for seven windows of 2 s, on one keep-alive connection."""
    base, _ = serve(LIMIT, WINDOW)
    period = WINDOW / LIMIT / 4
    log: list[tuple[float, float, int, dict]] = []  # (sent, answered, status, headers)
    with httpx.Client(timeout=10) as client:
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < 7 * WINDOW:
            sent = time.monotonic()
            response = client.get(f"{base}/api/v1/runtime")
            log.append((sent, time.monotonic(), response.status_code, dict(response.headers)))
            n += 1
            time.sleep(max(0.0, start + n * period - time.monotonic()))
    admitted = [(s, a) for s, a, status, _ in log if status == 200]
    assert {status for *_, status, _ in log} == {200, 429}

    # the burst at the start: exactly the limit, Remaining counting down to 0 on the last one
    first = log[:LIMIT + 1]
    assert [status for _, _, status, _ in first] == [200] * LIMIT + [429]
    assert [int(h["ratelimit-remaining"]) for *_, h in first[:LIMIT]] == list(range(LIMIT - 1, -1, -1))
    assert first[LIMIT][3]["ratelimit-remaining"] == "0" and int(first[LIMIT][3]["retry-after"]) >= 1

    # every admitted pair: LIMIT + 1 admitted whose whole span fits in one window would be a breach
    for i in range(len(admitted) - LIMIT):
        first_sent, last_answered = admitted[i][0], admitted[i + LIMIT][1]
        assert last_answered - first_sent > WINDOW, (i, last_answered - first_sent)

    # and the client waited at most 10% past the window: each refusal came with LIMIT admitted
    # requests (as the server saw them) within the 1.1 windows before it
    for sent, answered, status, _ in log:
        if status == 429:
            recent = [1 for s, a in admitted if a > sent - 1.1 * WINDOW and s <= answered]
            assert len(recent) >= LIMIT, sent - start
    assert len(admitted) >= LIMIT * 5  # 14 s at most 2.2 s per turn of the limit: 6 turns, less jitter
