"""Slow request bodies (docs/http-security.md): a body that has not fully arrived within
``server.bodyTimeoutSeconds`` is answered 408 ``request_timeout`` or its connection closed,
on every route, authenticated or not. Tried against ``risoluto serve`` with raw sockets that
send headers and then stall or trickle, with Content-Length and with chunked encoding."""

from __future__ import annotations

import json
import socket
import time

import pytest
from http_support import free_port

from risoluto.errors import ConfigError
from risoluto.settings import build_settings
from serve_util import RISOLUTO, operator_env, spawn, stop, wait_answering

TIMEOUT = 1.0  # server.bodyTimeoutSeconds in these tests
SLACK = 1.5  # scheduling on a loaded machine; far below the minutes a stalled body used to hold
TOKEN = "body-timeout-test-token"


def test_the_setting_defaults_to_10_and_is_validated(tmp_path):
    env = {"DATA_DIR": str(tmp_path)}
    assert build_settings({}, None, env).server.body_timeout_seconds == 10
    assert build_settings({"server": {"body_timeout_seconds": 2.5}}, None, env).server.body_timeout_seconds == 2.5
    for bad in (0, -1, 3601, float("inf"), float("nan"), "ten", True):
        with pytest.raises(ConfigError, match="server.bodyTimeoutSeconds"):
            build_settings({"server": {"bodyTimeoutSeconds": bad}}, None, env)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("body-timeout")
    (base / "config.yaml").write_text(f"server:\n  bodyTimeoutSeconds: {TIMEOUT}\n")
    port = free_port()
    env = operator_env(DATA_DIR=str(base / "data"), RISOLUTO_PORT=str(port),
                       RISOLUTO_CONFIG=str(base / "config.yaml"), RISOLUTO_WRITE_TOKEN=TOKEN)
    proc = spawn([*RISOLUTO, "serve"], env, cwd=base)
    try:
        assert wait_answering(proc, f"http://127.0.0.1:{port}/api/v1/runtime") is not None, proc.stderr.read()
        yield port, base / "data"
    finally:
        stop(proc)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (the
    time since the call); fails if the connection is still open after ``limit`` seconds."""
    start = time.monotonic()
    data = b""
    while True:
        left = limit - (time.monotonic() - start)
        if left <= 0:
            raise AssertionError(f"connection still open after {limit:.1f} s; received {data[:200]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    header_block, _, body = raw.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def assert_408(raw: bytes) -> dict[str, str]:
    status, headers, body = parse(raw)
    assert status == 408, raw[:300]
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert headers["x-request-id"]
    return headers


WEBHOOK = ("POST", "/webhooks/linear", "Content-Type: application/json", "Linear-Delivery: slow-1")
OVERLAY = ("PUT", "/api/v1/config/overlay", "Content-Type: application/json", f"Authorization: Bearer {TOKEN}")


@pytest.mark.parametrize("request_line", [WEBHOOK, OVERLAY], ids=["webhook-unauthenticated", "write-authenticated"])
def test_stalled_body_is_cut_within_the_timeout(server, request_line):
    port, _ = server
    method, path, *headers = request_line
    with connect(port) as sock:
        sock.sendall(head(method, path, *headers, "Content-Length: 200") + b'{"partial": ')
        raw, closed_after = read_until_closed(sock, TIMEOUT + SLACK)
    assert closed_after >= TIMEOUT * 0.8  # the deadline cut it, not an early refusal
    headers = assert_408(raw)
    assert headers["connection"] == "close"


def trickle(port: int, framing: str, piece: bytes) -> tuple[float, bytes]:
    """Send the head, then ``piece`` every 0.2 s until the server closes: (seconds it took, answer)."""
    with connect(port) as sock:
        sock.sendall(head(*WEBHOOK, framing))
        start = time.monotonic()
        with pytest.raises(OSError):  # the server closes while we are still trickling
            while time.monotonic() - start < TIMEOUT + SLACK + 3:
                sock.sendall(piece)
                time.sleep(0.2)
        elapsed = time.monotonic() - start
        raw, _ = read_until_closed(sock, 1.0)
    return elapsed, raw


def test_a_trickled_body_cannot_stretch_the_deadline(server):
    """One byte every 0.2 s would keep a per-read timeout happy forever; the deadline is absolute."""
    port, _ = server
    elapsed, raw = trickle(port, "Content-Length: 100", b" ")
    assert elapsed < TIMEOUT + SLACK + 0.5
    assert_408(raw)


def test_chunked_encoding_cannot_dodge_the_deadline(server):
    port, _ = server
    elapsed, raw = trickle(port, "Transfer-Encoding: chunked", b"1\r\n \r\n")  # a valid one-byte chunk, never the last
    assert elapsed < TIMEOUT + SLACK + 0.5
    assert_408(raw)


def test_chunked_body_stalled_after_headers(server):
    port, _ = server
    with connect(port) as sock:
        sock.sendall(head(*WEBHOOK, "Transfer-Encoding: chunked") + b"4\r\n{\"a\"\r\n")
        raw, closed_after = read_until_closed(sock, TIMEOUT + SLACK)
    assert closed_after >= TIMEOUT * 0.8
    assert_408(raw)


def test_refused_before_the_body_still_closes_the_connection(server):
    """A write without the token is refused at once; the body it announced never comes, and the
    connection does not stay open waiting for it."""
    port, _ = server
    with connect(port) as sock:
        sock.sendall(head("PUT", "/api/v1/config/overlay", "Content-Type: application/json",
                          "Content-Length: 500") + b"{")
        raw, closed_after = read_until_closed(sock, TIMEOUT + SLACK)
    status, _, body = parse(raw)
    assert status == 401 and json.loads(body)["error"]["code"] == "write_unauthorized"
    assert closed_after < TIMEOUT + SLACK


def test_body_that_arrives_in_time_is_served(server):
    """The control: the same slow-ish client, finishing inside the timeout, gets a real answer."""
    port, _ = server
    body = b'{"server": {}}'
    with connect(port) as sock:
        sock.sendall(head(*OVERLAY, f"Content-Length: {len(body)}", "Connection: close") + body[:5])
        time.sleep(TIMEOUT * 0.4)
        sock.sendall(body[5:])
        raw, _ = read_until_closed(sock, 10)
    status, _, data = parse(raw)
    assert status != 408, raw[:300]
    assert json.loads(data).get("error", {}).get("code") != "request_timeout"


def test_the_audit_records_the_timed_out_write_as_408(server):
    port, data_dir = server
    with connect(port) as sock:
        sock.sendall(head(*OVERLAY, "Content-Length: 50", "X-Request-ID: slow-write-audit") + b"{")
        raw, _ = read_until_closed(sock, TIMEOUT + SLACK)
    assert assert_408(raw)["x-request-id"] == "slow-write-audit"
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in (data_dir / "write-audit.log").read_text().splitlines()]
        mine = [r for r in records if r.get("request_id") == "slow-write-audit"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(r["status"], r["method"], r["path"]) for r in mine] == [(408, "PUT", "/api/v1/config/overlay")]


def test_keep_alive_requests_without_a_body_are_untouched(server):
    port, _ = server
    with connect(port) as sock:
        for _ in range(3):
            sock.sendall(head("GET", "/api/v1/runtime"))
            time.sleep(TIMEOUT * 0.6)  # idle between requests, each well inside keep-alive
            status, headers, _ = parse(sock.recv(65536))
            assert status == 200 and headers.get("connection") != "close"


def test_http2_body_without_length_is_cut_too(server):
    """HTTP/2 (cleartext, prior knowledge) needs no Content-Length for a body: still cut."""
    import h2.config
    import h2.connection
    import h2.events

    port, _ = server
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    status, body, ended = None, b"", None
    with connect(port) as sock:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", "/webhooks/linear"), (":scheme", "http"),
                              (":authority", "127.0.0.1"), ("linear-delivery", "h2-slow")])
        conn.send_data(1, b'{"partial": ')  # and the stream is never ended
        sock.sendall(conn.data_to_send())
        start = time.monotonic()
        while ended is None and time.monotonic() - start < TIMEOUT + SLACK:
            sock.settimeout(TIMEOUT + SLACK)
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = time.monotonic() - start
            sock.sendall(conn.data_to_send())
    assert status == b"408" and json.loads(body)["error"]["code"] == "request_timeout"
    assert ended is not None and TIMEOUT * 0.8 <= ended < TIMEOUT + SLACK
