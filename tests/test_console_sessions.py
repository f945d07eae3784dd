"""The console's sign-in and its session cookie, through the app (no browser): what the cookie
looks like, which guard accepts it for what, and every way a session must stop working
(sign-out, a changed token, expiry, a cross-origin write riding it). Also the two read routes
the console adds (audit lines and the per-minute series). The same behaviour is driven from a
real browser in tests/test_console.py."""

from __future__ import annotations

import json
import time
from http.cookies import SimpleCookie

import pytest

from risoluto import sessions as _sessions
from risoluto.sessions import COOKIE, MAX_AGE_SECONDS, SessionStore
from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio

WRITE = "w-" + "c" * 40
READ = "r-" + "d" * 40
REMOTE = {"client": ("203.0.113.9", 40000)}
LOOP = {"client": ("127.0.0.1", 40000)}
SITE = "console.example:4000"
ORIGIN = f"http://{SITE}"
SECRET_VALUE = "s3cr3t-value-that-must-never-come-back"


async def make(risoluto_client, **env):
    names = {"write": "RISOLUTO_WRITE_TOKEN", "read": "RISOLUTO_READ_TOKEN", "proxies": "RISOLUTO_TRUSTED_PROXIES"}
    environ = {names[k]: v for k, v in env.items()} | {"MASTER_KEY": "console-test-master-key"}
    client = await risoluto_client(env=environ)
    client.cookie_jar = None  # every cookie in these tests is sent explicitly
    return client


async def send(client, method, path, scope=REMOTE, headers=None, **kw):
    from werkzeug.datastructures import Headers

    h = Headers(headers) if isinstance(headers, list) else Headers({"Host": SITE, **(headers or {})})
    response = await client.open(path, method=method, headers=h, scope_base=scope, **kw)
    data = await response.get_data()
    try:
        body = json.loads(data)
    except ValueError:
        body = data.decode("utf-8", "replace")
    return response.status_code, body, response


async def sign_in(client, token, scope=REMOTE, origin=ORIGIN, headers=None):
    h = {"Origin": origin} if origin else {}
    return await send(client, "POST", "/console/session", scope, {**h, **(headers or {})}, form={"token": token})


def session_cookie(response) -> SimpleCookie:
    jar = SimpleCookie()
    for header in response.headers.getlist("Set-Cookie"):
        jar.load(header)
    return jar


def cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={value}"}


def code(body):
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


# --- sign-in ---------------------------------------------------------------------------------

async def test_sign_in_sets_an_httponly_strict_random_cookie_and_no_token_anywhere(risoluto_client):
    client = await make(risoluto_client, write=WRITE, read=READ)
    values = set()
    for _ in range(3):
        status, body, response = await sign_in(client, READ)
        assert (status, response.headers["Location"]) == (303, "/")
        assert len(response.headers.getlist("Set-Cookie")) == 1
        raw = response.headers["Set-Cookie"]
        morsel = session_cookie(response)[COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
        assert int(morsel["max-age"]) == MAX_AGE_SECONDS == 12 * 3600
        assert not morsel["secure"]  # plain http: a Secure cookie would never come back
        assert len(morsel.value) >= 43  # 32 random bytes, base64url
        assert READ not in raw and WRITE not in raw and READ not in str(body)
        values.add(morsel.value)
    assert len(values) == 3  # a new random value per sign-in


async def test_sign_in_over_tls_sets_a_secure_cookie(risoluto_client):
    client = await make(risoluto_client, read=READ)
    _, _, response = await sign_in(client, READ, scope={**REMOTE, "scheme": "https"}, origin=f"https://{SITE}")
    assert session_cookie(response)[COOKIE]["secure"]


async def test_sign_in_through_a_tls_terminating_trusted_proxy_sets_a_secure_cookie(risoluto_client):
    client = await make(risoluto_client, read=READ, proxies="10.9.0.0/24")
    proxy = {"client": ("10.9.0.5", 40000)}
    headers = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    status, _, response = await sign_in(client, READ, scope=proxy, origin=f"https://{SITE}", headers=headers)
    assert status == 303 and session_cookie(response)[COOKIE]["secure"]
    # the header means nothing from a peer that is not a trusted proxy
    status, _, response = await sign_in(client, READ, origin=f"https://{SITE}", headers={"X-Forwarded-Proto": "https"})
    assert status == 403 and not response.headers.getlist("Set-Cookie")


@pytest.mark.parametrize("token", ["", "wrong", READ + "x", READ[:-1], "\u00e9" * 30, "x" * 5000])
async def test_a_wrong_token_gets_the_form_again_and_no_cookie(risoluto_client, token):
    client = await make(risoluto_client, write=WRITE, read=READ)
    status, body, response = await sign_in(client, token)
    assert status == 401 and not response.headers.getlist("Set-Cookie")
    assert 'action="/console/session"' in body and "not valid" in body


async def test_sign_in_from_another_origin_is_refused(risoluto_client):
    client = await make(risoluto_client, write=WRITE)
    for origin in ("http://evil.example", "null", f"https://{SITE}", "http://console.example:4001"):
        status, body, response = await sign_in(client, WRITE, origin=origin)
        assert status == 403 and not response.headers.getlist("Set-Cookie"), origin


async def test_the_token_is_never_taken_from_the_url(risoluto_client):
    client = await make(risoluto_client, write=WRITE)
    status, _, response = await send(client, "POST", f"/console/session?token={WRITE}", headers={"Origin": ORIGIN})
    assert status == 401 and not response.headers.getlist("Set-Cookie")
    status, body, _ = await send(client, "GET", f"/?token={WRITE}")
    assert status == 401 and 'id="sign-in"' in body


async def test_sign_in_attempts_are_audited_without_the_token(risoluto_client, risoluto_data_dir):
    client = await make(risoluto_client, write=WRITE)
    await sign_in(client, "wrong")
    await sign_in(client, WRITE)
    text = (risoluto_data_dir / "write-audit.log").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(e["path"], e["status"], e["principal"]) for e in lines] == [
        ("/console/session", 401, "sign-in"), ("/console/session", 303, "sign-in")]
    assert WRITE not in text


# --- what a session may do -----------------------------------------------------------------

async def test_the_page_from_afar_without_a_session_is_only_the_sign_in_form(risoluto_client):
    client = await make(risoluto_client, write=WRITE, read=READ)
    status, body, response = await send(client, "GET", "/")
    assert status == 401 and 'id="sign-in"' in body and "checklist" not in body
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    status, body, _ = await send(client, "GET", "/api/v1/hardening")
    assert (status, code(body)) == (401, "read_unauthorized")


async def test_a_read_session_reads_but_never_writes(risoluto_client):
    client = await make(risoluto_client, write=WRITE, read=READ)
    _, _, response = await sign_in(client, READ)
    cookie = cookie_header(session_cookie(response)[COOKIE].value)
    status, body, _ = await send(client, "GET", "/", headers=cookie)
    assert status == 200 and 'data-principal="session"' in body and 'data-writes="sign-in"' in body
    assert READ not in body and WRITE not in body
    status, body, _ = await send(client, "GET", "/api/v1/hardening", headers=cookie)
    assert status == 200 and body["items"]
    status, body, _ = await send(client, "PUT", "/api/v1/secrets/A", headers={**cookie, "Origin": ORIGIN},
                                 json={"value": SECRET_VALUE})
    assert (status, code(body)) == (403, "write_forbidden")


async def test_a_write_session_writes_only_from_its_own_origin(risoluto_client, risoluto_data_dir):
    client = await make(risoluto_client, write=WRITE, read=READ)
    _, _, response = await sign_in(client, WRITE)
    cookie = cookie_header(session_cookie(response)[COOKIE].value)
    status, body, _ = await send(client, "GET", "/", headers=cookie)
    assert 'data-writes="yes"' in body
    ok = await send(client, "PUT", "/api/v1/secrets/A", headers={**cookie, "Origin": ORIGIN}, json={"value": "v1"})
    assert ok[0] == 204
    # CSRF: the cookie rides a request another page made; the Origin gives it away
    for origin in ("http://evil.example", "http://console.example:4001", "null", f"https://{SITE}"):
        status, body, _ = await send(client, "PUT", "/api/v1/secrets/B", headers={**cookie, "Origin": origin},
                                     json={"value": "v2"})
        assert (status, code(body)) == (403, "write_forbidden"), origin
    # no Origin at all, or two of them: refused as well (browsers always send one on writes)
    assert (await send(client, "DELETE", "/api/v1/secrets/A", headers=cookie))[0] == 403
    status, _, _ = await send(client, "DELETE", "/api/v1/secrets/A",
                              headers=[("Host", SITE), ("Cookie", cookie["Cookie"]), ("Origin", ORIGIN), ("Origin", ORIGIN)])
    assert status == 403
    _, body, _ = await send(client, "GET", "/api/v1/secrets", headers=cookie)
    assert body == {"keys": ["A"]}
    audit = [json.loads(line) for line in (risoluto_data_dir / "write-audit.log").read_text().splitlines()]
    assert [(e["path"], e["principal"], e["remote"]) for e in audit if e["path"] == "/api/v1/secrets/A"] == [
        ("/api/v1/secrets/A", "session", "203.0.113.9")]


async def test_a_bearer_beside_a_cookie_decides_alone(risoluto_client):
    client = await make(risoluto_client, write=WRITE, read=READ)
    _, _, response = await sign_in(client, WRITE)
    cookie = cookie_header(session_cookie(response)[COOKIE].value)
    status, body, _ = await send(client, "GET", "/api/v1/hardening",
                                 headers={**cookie, "Authorization": "Bearer wrong"})
    assert (status, code(body)) == (401, "read_unauthorized")
    status, body, _ = await send(client, "PUT", "/api/v1/secrets/A", json={"value": "v"},
                                 headers={**cookie, "Origin": ORIGIN, "Authorization": "Bearer wrong"})
    assert (status, code(body)) == (401, "write_unauthorized")


@pytest.mark.parametrize("forged", ["", "x", "A" * 43, "A" * 500, "%00", "a b"])
async def test_a_forged_or_unknown_cookie_is_nobody(risoluto_client, forged):
    client = await make(risoluto_client, write=WRITE, read=READ)
    await sign_in(client, WRITE)
    status, body, _ = await send(client, "GET", "/", headers=cookie_header(forged))
    assert status == 401 and 'id="sign-in"' in body
    status, body, _ = await send(client, "PUT", "/api/v1/secrets/A", json={"value": "v"},
                                 headers={**cookie_header(forged), "Origin": ORIGIN})
    assert (status, code(body)) == (401, "write_unauthorized")


async def test_the_same_cookie_name_twice_is_refused(risoluto_client):
    client = await make(risoluto_client, read=READ)
    _, _, response = await sign_in(client, READ)
    value = session_cookie(response)[COOKIE].value
    status, _, _ = await send(client, "GET", "/api/v1/hardening", headers={"Cookie": f"{COOKIE}={value}; {COOKIE}=x"})
    assert status == 401


async def test_sign_out_ends_the_session_on_the_server(risoluto_client):
    client = await make(risoluto_client, write=WRITE)
    _, _, response = await sign_in(client, WRITE)
    cookie = cookie_header(session_cookie(response)[COOKIE].value)
    assert (await send(client, "GET", "/api/v1/hardening", headers=cookie))[0] == 200
    # another site cannot sign the operator out
    status, _, _ = await send(client, "POST", "/console/session/end", headers={**cookie, "Origin": "http://evil.example"})
    assert status == 403
    assert (await send(client, "GET", "/api/v1/hardening", headers=cookie))[0] == 200
    status, _, response = await send(client, "POST", "/console/session/end", headers={**cookie, "Origin": ORIGIN})
    assert status == 303
    cleared = session_cookie(response)[COOKIE]
    assert cleared.value == "" and cleared["max-age"] in ("0", 0)
    # the old value, replayed, is nobody: reads and writes
    assert (await send(client, "GET", "/api/v1/hardening", headers=cookie))[0] == 401
    status, _, _ = await send(client, "PUT", "/api/v1/secrets/A", json={"value": "v"}, headers={**cookie, "Origin": ORIGIN})
    assert status == 401


async def test_loopback_with_a_write_token_must_sign_in_to_write(risoluto_client):
    client = await make(risoluto_client, write=WRITE)
    status, body, _ = await send(client, "GET", "/", scope=LOOP, headers={"Host": "127.0.0.1:4000"})
    assert status == 200 and 'data-principal="loopback"' in body and 'data-writes="sign-in"' in body
    origin = "http://127.0.0.1:4000"
    _, _, response = await sign_in(client, WRITE, scope=LOOP, origin=origin, headers={"Host": "127.0.0.1:4000"})
    cookie = cookie_header(session_cookie(response)[COOKIE].value)
    status, body, _ = await send(client, "GET", "/", scope=LOOP, headers={"Host": "127.0.0.1:4000", **cookie})
    assert 'data-writes="yes"' in body
    status, _, _ = await send(client, "PUT", "/api/v1/secrets/A", scope=LOOP, json={"value": "v"},
                              headers={"Host": "127.0.0.1:4000", "Origin": origin, **cookie})
    assert status == 204


# --- the store: token changes and expiry -----------------------------------------------------

def settings_with(**env):
    names = {"write": "RISOLUTO_WRITE_TOKEN", "read": "RISOLUTO_READ_TOKEN"}
    return build_settings({}, None, {"DATA_DIR": "/nonexistent", **{names[k]: v for k, v in env.items()}})


def test_a_session_stops_when_its_token_changes_or_goes():
    store = SessionStore()
    read_cookie = store.create(_sessions.READ, READ)
    write_cookie = store.create(_sessions.WRITE, WRITE)
    same = settings_with(write=WRITE, read=READ)
    assert store.lookup(read_cookie, same).kind == "read" and store.lookup(write_cookie, same).kind == "write"
    rotated = settings_with(write=WRITE + "2", read=READ)
    assert store.lookup(write_cookie, rotated) is None
    assert store.lookup(write_cookie, same) is None  # gone for good, even if the old token comes back
    assert store.lookup(read_cookie, settings_with(write=WRITE)) is None
    assert len(store) == 0


def test_a_session_lives_at_most_twelve_hours(monkeypatch):
    store = SessionStore()
    cookie = store.create(_sessions.READ, READ)
    settings = settings_with(read=READ)
    now = time.monotonic()
    monkeypatch.setattr(_sessions.time, "monotonic", lambda: now + 12 * 3600 - 5)
    assert store.lookup(cookie, settings) is not None  # use does not extend it
    monkeypatch.setattr(_sessions.time, "monotonic", lambda: now + 12 * 3600 + 1)
    assert store.lookup(cookie, settings) is None


def test_the_store_keeps_only_digests_and_is_bounded():
    store = SessionStore()
    cookies = [store.create(_sessions.READ, READ) for _ in range(_sessions.MAX_SESSIONS + 5)]
    assert len(store) == _sessions.MAX_SESSIONS
    settings = settings_with(read=READ)
    assert store.lookup(cookies[0], settings) is None and store.lookup(cookies[-1], settings) is not None
    kept = repr(store._by_hash)
    assert not any(c in kept for c in cookies[-5:]) and READ not in kept


# --- the console's read routes ---------------------------------------------------------------

async def test_audit_route_returns_known_fields_newest_first_and_never_a_value(risoluto_client, risoluto_data_dir):
    client = await make(risoluto_client)
    for n in range(3):
        assert (await send(client, "PUT", f"/api/v1/secrets/K{n}", scope=LOOP, headers={"Host": "127.0.0.1"},
                           json={"value": SECRET_VALUE}))[0] == 204
    with open(risoluto_data_dir / "write-audit.log", "a") as fh:  # a torn line and a foreign field
        fh.write('{"at": "x", "method": "PUT", "path": "/p", "extra": "' + SECRET_VALUE + '"}\n{"at": \n')
    status, body, _ = await send(client, "GET", "/api/v1/audit?log=secrets&limit=2", scope=LOOP,
                                 headers={"Host": "127.0.0.1"})
    assert status == 200 and [e["key"] for e in body["items"]] == ["K2", "K1"]
    assert set(body["items"][0]) == {"at", "operation", "key", "principal", "remote", "backend"}
    status, body, _ = await send(client, "GET", "/api/v1/audit?log=write", scope=LOOP, headers={"Host": "127.0.0.1"})
    assert status == 200 and body["items"][0] == {"at": "x", "method": "PUT", "path": "/p"}
    assert [e["path"] for e in body["items"][1:]] == ["/api/v1/secrets/K2", "/api/v1/secrets/K1", "/api/v1/secrets/K0"]
    assert SECRET_VALUE not in json.dumps(body)
    for bad in ("log=other", "limit=0", "limit=1001", "limit=x", "limit=-1", "limit=99999999999"):
        status, body, _ = await send(client, "GET", f"/api/v1/audit?{bad}", scope=LOOP, headers={"Host": "127.0.0.1"})
        assert status == 400 and code(body) in ("invalid_log", "invalid_limit"), bad
    status, body, _ = await send(client, "GET", "/api/v1/audit?log=secrets")  # remote, no token configured
    assert (status, code(body)) == (403, "read_forbidden")


async def test_stats_series_counts_requests_429s_and_egress_log_lines(risoluto_client, risoluto_data_dir):
    client = await risoluto_client(config={"rateLimit": {"api": {"limit": 5, "windowSeconds": 60}}},
                                   env={"RISOLUTO_READ_TOKEN": READ})
    statuses = [(await client.get("/api/v1/hardening")).status_code for _ in range(7)]
    assert statuses.count(429) == 2
    now = time.time()
    stamp = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"  # noqa: E731
    lines = [{"at": stamp(now - 61 * 60), "verdict": "allow"}] + [{"at": stamp(now - 1), "verdict": "deny"}] * 3
    (risoluto_data_dir / "egress-audit.log").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # read from another client address (the loopback client spent its limit)
    status, body, _ = await send(client, "GET", "/api/v1/stats/series", headers={"Authorization": f"Bearer {READ}"})
    assert status == 200
    assert len(body["requests"]) == len(body["rate_limited"]) == len(body["egress"]) == 60
    assert sum(body["rate_limited"]) == 2 and sum(body["requests"]) >= 7
    assert sum(body["egress"]) == 3 and body["egress"][-1] + body["egress"][-2] == 3
    (risoluto_data_dir / "egress-audit.log").unlink()
    status, body, _ = await send(client, "GET", "/api/v1/stats/series", headers={"Authorization": f"Bearer {READ}"})
    assert body["egress"] is None
