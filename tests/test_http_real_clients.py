"""The write and read guards on real sockets: hypercorn serving on 127.0.0.1 and on a veth
address, clients on loopback (httpx) and inside a network namespace (curl), for each token
configuration. Also raw-socket bad input the test client cannot produce."""

import socket

import httpx
import pytest

from http_support import HOST_IP, NS_IP, WRITE_METHODS, EchoPlugin, ServerThread, netns  # noqa: F401 (netns: a fixture)

WRITE = "w-" + "k" * 40
READ = "r-" + "q" * 40

CONFIGS = {
    "none": {},
    "write": {"RISOLUTO_WRITE_TOKEN": WRITE},
    "read": {"RISOLUTO_READ_TOKEN": READ},
    "both": {"RISOLUTO_WRITE_TOKEN": WRITE, "RISOLUTO_READ_TOKEN": READ},
}


def expected_write(config, where, bearer):
    """The published table (docs/http-security.md): (status, code) for a write."""
    env = CONFIGS[config]
    if "RISOLUTO_WRITE_TOKEN" in env:
        return (200, None) if bearer == WRITE else (401, "write_unauthorized")
    if where == "loopback":
        return (200, None)
    return (403, "write_forbidden")


def expected_read(config, where, bearer):
    """The read guard (+ 403 read_forbidden for remote reads when no token exists at all)."""
    env = CONFIGS[config]
    tokens = [t for t in env.values()]
    if where == "loopback":
        return (200, None)
    if not tokens:
        return (403, "read_forbidden")
    return (200, None) if bearer in tokens else (401, "read_unauthorized")


@pytest.fixture(scope="module", params=list(CONFIGS))
def server(request, tmp_path_factory, netns):
    data = tmp_path_factory.mktemp(f"data-{request.param}")
    srv = ServerThread(str(data), CONFIGS[request.param], ["127.0.0.1", HOST_IP],
                       plugins=(("echo", EchoPlugin()),)).start()
    srv.config = request.param
    srv.data = data
    try:
        yield srv
    finally:
        srv.stop()


BEARERS = [None, WRITE, READ, "wrong-token"]


def local(server, method, path, bearer=None, headers=None):
    h = dict(headers or {})
    if bearer:
        h["Authorization"] = f"Bearer {bearer}"
    r = httpx.request(method, server.url() + path, headers=h, timeout=10)
    body = r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else None
    return r.status_code, body


def remote(netns, server, method, path, bearer=None, headers=()):
    h = list(headers)
    if bearer:
        h.append(f"Authorization: Bearer {bearer}")
    return netns.curl(method, server.url(HOST_IP) + path, h)


def code(body):
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


@pytest.mark.netns
@pytest.mark.parametrize("bearer", BEARERS)
@pytest.mark.parametrize("method", WRITE_METHODS)
def test_write_matrix_loopback(server, method, bearer):
    status, body = local(server, method, "/api/v1/test/echo", bearer)
    assert (status, code(body)) == expected_write(server.config, "loopback", bearer)
    if status == 200:
        assert body["client"] == "127.0.0.1"
        assert body["principal"] == ("token" if "RISOLUTO_WRITE_TOKEN" in CONFIGS[server.config] else "loopback")


# A remote client may claim any Host: with "Host: localhost" only the socket peer decides.
HOSTS = [(), ("Host: localhost",), ("Host: 127.0.0.1",)]


@pytest.mark.netns
@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("bearer", BEARERS)
@pytest.mark.parametrize("method", WRITE_METHODS)
def test_write_matrix_remote(netns, server, method, bearer, host):
    status, body = remote(netns, server, method, "/api/v1/test/echo", bearer, headers=host)
    assert (status, code(body)) == expected_write(server.config, "remote", bearer)
    if status == 200:
        assert (body["client"], body["principal"]) == (NS_IP, "token")


@pytest.mark.netns
@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("bearer", BEARERS)
def test_read_matrix(netns, server, bearer, host):
    for path in ("/api/v1/test/read", "/metrics"):
        status, body = local(server, "GET", path, bearer)
        assert (status, code(body)) == expected_read(server.config, "loopback", bearer), path
        status, body = remote(netns, server, "GET", path, bearer, headers=host)
        assert (status, code(body)) == expected_read(server.config, "remote", bearer), path


@pytest.mark.netns
def test_public_and_exempt_routes_from_afar(netns, server):
    assert remote(netns, server, "GET", "/api/v1/runtime")[0] == 200
    assert remote(netns, server, "GET", "/api/v1/openapi.json")[0] == 200
    # safe methods are exempt from the write guard (the read guard still applies to /api)
    assert remote(netns, server, "GET", "/plain/echo")[0] == 200
    assert remote(netns, server, "OPTIONS", "/plain/echo")[0] == 200
    # /webhooks/* is left to its HMAC: no secret store here, so its own 503, not a guard code
    status, body = remote(netns, server, "POST", "/webhooks/linear")
    assert (status, code(body)) == (503, "webhook_not_configured")


@pytest.mark.netns
@pytest.mark.parametrize("path", [
    "/API/v1/test/echo", "//api/v1/test/echo", "/api//v1/test/echo", "/api/v1/test/echo/", "/api/v1/test/./echo",
    "/api/v1/x/../test/echo", "/api/v1/test/%65cho", "/api%2Fv1%2Ftest%2Fecho", "/webhooks/../api/v1/test/echo",
    "/webhooks/%2e%2e/api/v1/test/echo", "/webhooks/linear/", "/Webhooks/linear", "/webhooks//linear",
])
def test_raw_path_variants_from_afar(netns, server, path):
    # curl runs with --path-as-is: dots and slashes go on the wire exactly as written
    status, body = netns.curl("POST", server.url(HOST_IP) + path, ["Host: localhost"])
    if CONFIGS[server.config].get("RISOLUTO_WRITE_TOKEN"):
        assert (status, code(body)) == (401, "write_unauthorized"), (path, status, body)
    else:
        assert (status, code(body)) == (403, "write_forbidden"), (path, status, body)


@pytest.mark.netns
def test_spoofed_forwarded_for_from_afar(netns, server):
    status, body = remote(netns, server, "POST", "/api/v1/test/echo",
                          headers=["X-Forwarded-For: 127.0.0.1", "X-Real-IP: 127.0.0.1", "Forwarded: for=127.0.0.1",
                                   "Host: localhost"])
    assert status in (401, 403) and code(body) in ("write_unauthorized", "write_forbidden")


@pytest.mark.netns
def test_many_authorization_headers_and_odd_case_from_afar(netns, server):
    if "RISOLUTO_WRITE_TOKEN" not in CONFIGS[server.config]:
        pytest.skip("token configurations only")
    ok = remote(netns, server, "POST", "/api/v1/test/echo", headers=[f"Authorization: bEaReR {WRITE}"])
    assert ok[0] == 200
    twice = [f"Authorization: Bearer {WRITE}", f"Authorization: Bearer {WRITE}"]
    status, body = remote(netns, server, "POST", "/api/v1/test/echo", headers=twice)
    assert (status, code(body)) == (401, "write_unauthorized")


@pytest.mark.netns
def test_audit_log_from_real_clients(netns, server):
    import json

    if server.config != "write":
        pytest.skip("one configuration is enough")
    log = server.data / "write-audit.log"
    before = log.read_text().count("\n") if log.exists() else 0
    remote(netns, server, "PATCH", "/api/v1/test/echo", WRITE, headers=["X-Request-ID: audit-remote"])
    local(server, "PATCH", "/api/v1/test/echo", WRITE, headers={"X-Request-ID": "audit-local"})
    lines = [json.loads(x) for x in (server.data / "write-audit.log").read_text().splitlines()[before:]]
    assert [(e["remote"], e["request_id"], e["principal"], e["status"]) for e in lines] == [
        (NS_IP, "audit-remote", "token", 200), ("127.0.0.1", "audit-local", "token", 200)]


# --- raw bytes on a loopback socket -------------------------------------------------------

def raw_request(port, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and b"connection: close" in data.lower():
                head_end = data.index(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in data[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(data) >= head_end + 4 + length[0]:
                    break
    return int(data.split(b" ", 2)[1]), data


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    srv = ServerThread(str(tmp_path_factory.mktemp("raw")), {"RISOLUTO_WRITE_TOKEN": "t\u00e9" + "k" * 30},
                       ["127.0.0.1"], plugins=(("echo", EchoPlugin()),)).start()
    yield srv
    srv.stop()


def post_with(port, auth: bytes) -> int:
    head = (b"POST /api/v1/test/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n"
            + auth + b"\r\n")
    return raw_request(port, head)[0]


def test_non_ascii_token_bytes_on_the_wire(token_server):
    token = ("t\u00e9" + "k" * 30).encode("utf-8")
    assert post_with(token_server.port, b"Authorization: Bearer " + token + b"\r\n") == 200
    latin1 = token.replace(b"\xc3\xa9", b"\xe9")  # the same text, other bytes
    assert post_with(token_server.port, b"Authorization: Bearer " + latin1 + b"\r\n") == 401
    assert post_with(token_server.port, b"Authorization: Bearer \xff\xfe\x80\r\n") == 401
    assert post_with(token_server.port, b"") == 401


def test_huge_and_many_headers_are_refused_without_500(token_server):
    huge = b"Authorization: Bearer " + b"a" * 200_000 + b"\r\n"
    status = post_with(token_server.port, huge)
    assert 400 <= status < 500
    many = b"".join(b"Authorization: Bearer x%d\r\n" % i for i in range(500))
    status = post_with(token_server.port, many)
    assert 400 <= status < 500
    token = ("t\u00e9" + "k" * 30).encode("utf-8")
    assert post_with(token_server.port, (b"Authorization: Bearer " + token + b"\r\n") * 2) == 401
