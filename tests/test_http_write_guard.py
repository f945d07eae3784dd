"""Write guard (docs/http-security.md) through the app: the table, browser defence, bad input,
path variants and the write audit log. The same matrix runs against a real server from
real loopback and non-loopback clients in test_http_real_clients.py."""

import json

import pytest

from http_support import WRITE_METHODS, EchoPlugin

pytestmark = pytest.mark.anyio

TOKEN = "w-" + "x" * 40
READ = "r-" + "y" * 40
REMOTE = {"client": ("203.0.113.9", 40000)}
LOOP = {"client": ("127.0.0.1", 40000)}
ECHO = (("echo", EchoPlugin()),)


async def make(risoluto_client, **env):
    names = {"write": "RISOLUTO_WRITE_TOKEN", "read": "RISOLUTO_READ_TOKEN", "proxies": "RISOLUTO_TRUSTED_PROXIES"}
    return await risoluto_client(env={names[k]: v for k, v in env.items()}, plugins=ECHO)


async def call(client, method, path="/api/v1/test/echo", scope=LOOP, headers=None, **kw):
    response = await client.open(path, method=method, headers=headers or {}, scope_base=scope, **kw)
    try:
        body = json.loads(await response.get_data())
    except ValueError:
        body = None
    return response.status_code, body, response


def code(body):
    return (body or {}).get("error", {}).get("code")


# --- the published table -----------------------------------------------------------

@pytest.mark.parametrize("method", WRITE_METHODS)
async def test_no_token_loopback_write_allowed_as_loopback(risoluto_client, method):
    client = await make(risoluto_client)
    status, body, _ = await call(client, method)
    assert status == 200 and body["principal"] == "loopback"


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_every_loopback_form_counts(risoluto_client, peer):
    client = await make(risoluto_client)
    status, body, _ = await call(client, "POST", scope={"client": (peer, 1)})
    assert status == 200 and body["principal"] == "loopback"


@pytest.mark.parametrize("method", WRITE_METHODS)
@pytest.mark.parametrize("peer", ["203.0.113.9", "10.0.0.2", "2001:db8::5", "::ffff:10.1.1.1", "0.0.0.0", ""])
async def test_no_token_remote_write_forbidden(risoluto_client, method, peer):
    client = await make(risoluto_client)
    status, body, _ = await call(client, method, scope={"client": (peer, 1)})
    assert (status, code(body)) == (403, "write_forbidden")


@pytest.mark.parametrize("scope", [LOOP, REMOTE])
@pytest.mark.parametrize("method", WRITE_METHODS)
async def test_token_needed_everywhere_once_configured(risoluto_client, scope, method):
    client = await make(risoluto_client, write=TOKEN)
    status, body, response = await call(client, method, scope=scope)
    assert (status, code(body)) == (401, "write_unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await call(client, method, scope=scope, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["principal"] == "token"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(risoluto_client, scheme):
    client = await make(risoluto_client, write=TOKEN)
    status, _, _ = await call(client, "POST", scope=REMOTE, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert status == 200


async def test_only_read_token_remote_writes_forbidden_loopback_allowed(risoluto_client):
    client = await make(risoluto_client, read=READ)
    for headers in ({}, {"Authorization": f"Bearer {READ}"}):
        status, body, _ = await call(client, "POST", scope=REMOTE, headers=headers)
        assert (status, code(body)) == (403, "write_forbidden")
    status, body, _ = await call(client, "POST")
    assert status == 200 and body["principal"] == "loopback"


async def test_read_token_never_authorizes_a_write(risoluto_client):
    client = await make(risoluto_client, write=TOKEN, read=READ)
    status, body, _ = await call(client, "POST", scope=REMOTE, headers={"Authorization": f"Bearer {READ}"})
    assert (status, code(body)) == (401, "write_unauthorized")


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_safe_methods_are_exempt(risoluto_client, method):
    client = await make(risoluto_client, write=TOKEN)
    status, _, _ = await call(client, method, path="/plain/echo", scope=REMOTE)
    assert status == 200


async def test_webhook_routes_are_left_to_their_hmac(risoluto_client):
    client = await make(risoluto_client, write=TOKEN)
    # no token from afar: the write guard stays out, the webhook answers with its own code
    status, body, _ = await call(client, "POST", path="/webhooks/linear", scope=REMOTE, data=b"{}")
    assert status == 503 and code(body) == "webhook_not_configured"


# --- browser defence for token-less loopback writes ----------------------------------

@pytest.mark.parametrize("origin", ["http://127.0.0.1:4000", "http://localhost:5173", "https://[::1]:8443",
                                    "http://localhost"])
async def test_loopback_origin_allowed(risoluto_client, origin):
    client = await make(risoluto_client)
    status, _, _ = await call(client, "POST", headers={"Origin": origin})
    assert status == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1.evil.example",
                                    "http://localhost.evil.example:4000", "file://", "http://user@localhost",
                                    "http://10.0.0.1:4000", "javascript:alert(1)", "http://[::1", "\u00e9"])
async def test_foreign_origin_refused(risoluto_client, origin):
    client = await make(risoluto_client)
    try:
        origin.encode("latin-1")
    except UnicodeEncodeError:
        pytest.skip("not sendable")
    status, body, _ = await call(client, "POST", headers={"Origin": origin})
    assert (status, code(body)) == (403, "write_forbidden")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:4000", "127.0.0.1.nip.io", "localhost:99999999",
                                  "::1", "10.0.0.1:4000", "localhost.evil.example"])
async def test_dns_rebinding_host_refused(risoluto_client, host):
    client = await make(risoluto_client)
    status, body, _ = await call(client, "POST", headers={"Host": host})
    assert (status, code(body)) == (403, "write_forbidden")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:4000", "127.0.0.1:4000", "[::1]:4000", "127.1.2.3"])
async def test_loopback_host_allowed(risoluto_client, host):
    client = await make(risoluto_client)
    status, _, _ = await call(client, "POST", headers={"Host": host})
    assert status == 200


async def test_token_write_is_not_subject_to_origin_checks(risoluto_client):
    client = await make(risoluto_client, write=TOKEN)
    headers = {"Origin": "https://ci.example", "Host": "api.example", "Authorization": f"Bearer {TOKEN}"}
    status, _, _ = await call(client, "POST", scope=REMOTE, headers=headers)
    assert status == 200


# --- bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "Bearer", "Bearer ", "Basic " + TOKEN, TOKEN, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
    "Bearer " + "\u00ff" * 40, "Bearer " + "a" * 60000, "Bearer \u00e9" + TOKEN, f"Token {TOKEN}",
    f"Bearer  {TOKEN} extra",
])
async def test_odd_authorization_values_are_401_never_500(risoluto_client, value):
    client = await make(risoluto_client, write=TOKEN)
    status, body, _ = await call(client, "POST", scope=REMOTE, headers={"Authorization": value})
    assert (status, code(body)) == (401, "write_unauthorized")


async def test_non_ascii_token_compares_bytes(risoluto_client):
    token = "s\u00e9cr\u00e8t-" + "z" * 30
    client = await make(risoluto_client, write=token)
    # the test client sends the token's UTF-8 bytes, as a real client would
    status, _, _ = await call(client, "POST", scope=REMOTE, headers={"Authorization": "Bearer " + token})
    assert status == 200
    mojibake = token.encode("utf-8").decode("latin-1")  # other bytes that look alike
    status, body, _ = await call(client, "POST", scope=REMOTE, headers={"Authorization": "Bearer " + mojibake})
    assert (status, code(body)) == (401, "write_unauthorized")


async def test_several_authorization_headers_are_refused(risoluto_client):
    from werkzeug.datastructures import Headers

    client = await make(risoluto_client, write=TOKEN)
    for n in (2, 50):
        headers = Headers([("Authorization", f"Bearer {TOKEN}")] * n)
        status, body, _ = await call(client, "POST", scope=REMOTE, headers=headers)
        assert (status, code(body)) == (401, "write_unauthorized")


async def test_token_in_query_string_is_ignored(risoluto_client):
    client = await make(risoluto_client, write=TOKEN)
    for qs in ({"token": TOKEN}, {"access_token": TOKEN}, {"authorization": f"Bearer {TOKEN}"}):
        status, body, _ = await call(client, "POST", scope=REMOTE, query_string=qs)
        assert (status, code(body)) == (401, "write_unauthorized")


# --- paths: the guard judges what the router serves -----------------------------------

VARIANTS = [
    "/API/v1/test/echo", "/api//v1/test/echo", "//api/v1/test/echo", "/api/v1/test/echo/",
    "/api/v1/test/../test/echo", "/api/v1/./test/echo", "/api/v1/test/echo%2F", "/api%2Fv1%2Ftest%2Fecho",
    "/api/v1/test/Echo", "/webhooks/../api/v1/test/echo", "/webhooks/linear/../../api/v1/test/echo",
    "/Webhooks/linear", "/webhooks/linear/", "/webhooks//linear", "/webhooks/LINEAR", "/webhooks/nope",
    "/api/v1/test/items/a%2Fb", "/api/v1/config/overlay/",
]


@pytest.mark.parametrize("path", VARIANTS)
async def test_no_path_variant_escapes_the_guard(risoluto_client, path):
    client = await make(risoluto_client, write=TOKEN)
    status, body, _ = await call(client, "POST", path=path, scope=REMOTE, data=b"{}")
    # whatever the router would do with it, an unauthenticated write never gets past the guard
    assert status == 401 and code(body) == "write_unauthorized", (path, status, body)
    client2 = await make(risoluto_client)
    status, body, _ = await call(client2, "DELETE", path=path, scope=REMOTE)
    assert (status, code(body)) == (403, "write_forbidden"), (path, status, body)


async def test_405_on_a_read_route_is_still_guarded(risoluto_client):
    client = await make(risoluto_client, write=TOKEN)
    status, body, _ = await call(client, "POST", path="/api/v1/test/read", scope=REMOTE)
    assert (status, code(body)) == (401, "write_unauthorized")
    status, body, _ = await call(client, "POST", path="/api/v1/test/read", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 405


# --- spoofed X-Forwarded-For ------------------------------------------------------------

async def test_spoofed_forwarded_for_from_untrusted_peer_changes_nothing(risoluto_client):
    client = await make(risoluto_client)
    headers = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
    status, body, _ = await call(client, "POST", scope=REMOTE, headers=headers)
    assert (status, code(body)) == (403, "write_forbidden")


async def test_request_relayed_by_loopback_proxy_is_not_loopback(risoluto_client):
    client = await make(risoluto_client, proxies="127.0.0.1/32")
    for headers in ({"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "127.0.0.1"}, {}):
        status, body, _ = await call(client, "POST", headers=headers)
        assert (status, code(body)) == (403, "write_forbidden"), headers


# --- audit log --------------------------------------------------------------------------

def audit_lines(data_dir):
    path = data_dir / "write-audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_audit_log_records_passed_writes_only(risoluto_client, risoluto_data_dir):
    client = await make(risoluto_client, write=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}", "X-Request-ID": "req-1"}
    await call(client, "PUT", scope=REMOTE, headers=auth)
    await call(client, "DELETE", path="/api/v1/test/items/x%0Ay", scope=REMOTE, headers={**auth, "X-Request-ID": "r2"})
    await call(client, "POST", path="/api/v1/nothing-here", scope=LOOP, headers={**auth, "X-Request-ID": "r3"})
    await call(client, "POST", scope=REMOTE)  # refused: not audited
    await call(client, "GET", path="/plain/echo", scope=REMOTE, headers=auth)  # a read: not audited
    lines = audit_lines(risoluto_data_dir)
    assert [(e["method"], e["path"], e["status"], e["request_id"]) for e in lines] == [
        ("PUT", "/api/v1/test/echo", 200, "req-1"),
        ("DELETE", "/api/v1/test/items/x\ny", 200, "r2"),
        ("POST", "/api/v1/nothing-here", 404, "r3"),
    ]
    assert {e["principal"] for e in lines} == {"token"}
    assert [e["remote"] for e in lines] == ["203.0.113.9", "203.0.113.9", "127.0.0.1"]
    assert set(lines[0]) == {"at", "method", "path", "status", "remote", "principal", "request_id"}
    assert lines[0]["at"].endswith("Z")
    assert (risoluto_data_dir / "write-audit.log").stat().st_mode & 0o777 == 0o600
    assert TOKEN not in (risoluto_data_dir / "write-audit.log").read_text()
    assert len((risoluto_data_dir / "write-audit.log").read_text().splitlines()) == 3  # newline stayed escaped


async def test_audit_log_loopback_principal(risoluto_client, risoluto_data_dir):
    client = await make(risoluto_client)
    await call(client, "PATCH")
    (entry,) = audit_lines(risoluto_data_dir)
    assert (entry["principal"], entry["remote"], entry["status"]) == ("loopback", "127.0.0.1", 200)


# --- doctor -----------------------------------------------------------------------------

def checks(settings, item):
    from risoluto.kernel import Kernel
    from risoluto.plugins.http import write_guard

    kernel = Kernel(settings)
    return [r for r in write_guard.risoluto_doctor_checks(kernel) if r.item == item][0]


@pytest.mark.parametrize("env,status", [
    ({}, "PASS"),
    ({"RISOLUTO_BIND": "0.0.0.0"}, "FAIL"),
    ({"RISOLUTO_BIND": "0.0.0.0", "RISOLUTO_READ_TOKEN": READ}, "WARN"),
    ({"RISOLUTO_BIND": "0.0.0.0", "RISOLUTO_WRITE_TOKEN": TOKEN}, "PASS"),
    ({"RISOLUTO_BIND": "0.0.0.0", "RISOLUTO_WRITE_TOKEN": "short"}, "WARN"),
    ({"RISOLUTO_WRITE_TOKEN": TOKEN, "RISOLUTO_READ_TOKEN": TOKEN}, "WARN"),
])
def test_doctor_write_token(risoluto_settings, env, status):
    result = checks(risoluto_settings(env=env), "Write token")
    assert result.status == status, result
    assert TOKEN not in result.reason and READ not in result.reason


async def test_write_refused_by_a_later_guard_is_not_audited(risoluto_client, risoluto_data_dir):
    from risoluto import hookimpl
    from risoluto.errors import ApiError

    class LateGuard:
        @hookimpl(trylast=True)
        def risoluto_request_authorize(self, info, settings):
            if info.mutating:
                return ApiError(403, "maintenance", "Writes are paused.")
            return None

    client = await risoluto_client(plugins=(*ECHO, ("late", LateGuard())))
    status, body, _ = await call(client, "POST")
    assert (status, code(body)) == (403, "maintenance")
    assert audit_lines(risoluto_data_dir) == []
