"""Read guard (docs/http-security.md) through the app; the real-socket version is in test_http_real_clients.py."""

import json

import pytest

from http_support import EchoPlugin

pytestmark = pytest.mark.anyio

WRITE = "w-" + "x" * 40
READ = "r-" + "y" * 40
REMOTE = {"client": ("198.51.100.20", 4000)}


async def make(risoluto_client, **env):
    names = {"write": "RISOLUTO_WRITE_TOKEN", "read": "RISOLUTO_READ_TOKEN", "proxies": "RISOLUTO_TRUSTED_PROXIES"}
    return await risoluto_client(env={names[k]: v for k, v in env.items()}, plugins=(("echo", EchoPlugin()),))


async def get(client, path="/api/v1/test/read", scope=REMOTE, headers=None, method="GET", **kw):
    response = await client.open(path, method=method, headers=headers or {}, scope_base=scope, **kw)
    raw = await response.get_data()
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw
    return response.status_code, body


def code(body):
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


@pytest.mark.parametrize("env", [{"read": READ}, {"write": WRITE}, {"read": READ, "write": WRITE}])
@pytest.mark.parametrize("path", ["/api/v1/test/read", "/metrics", "/api/v1/hardening"])
async def test_remote_read_needs_a_token(risoluto_client, env, path):
    client = await make(risoluto_client, **env)
    status, body = await get(client, path)
    assert (status, code(body)) == (401, "read_unauthorized")
    for token in env.values():
        status, _ = await get(client, path, headers={"Authorization": f"bearer {token}"})
        assert status == 200, (path, token)


async def test_wrong_or_odd_tokens_are_401(risoluto_client):
    from werkzeug.datastructures import Headers

    client = await make(risoluto_client, read=READ)
    for value in ("Bearer nope", f"Basic {READ}", READ, "Bearer " + "\u00ff" * 100, "Bearer " + "a" * 50000,
                  f"Bearer {READ[:-1]}", "Bearer"):
        status, body = await get(client, headers={"Authorization": value})
        assert (status, code(body)) == (401, "read_unauthorized"), value
    status, body = await get(client, headers=Headers([("Authorization", f"Bearer {READ}")] * 2))
    assert (status, code(body)) == (401, "read_unauthorized")


async def test_tokens_never_come_from_the_query_string(risoluto_client):
    client = await make(risoluto_client, read=READ)
    for qs in ({"token": READ}, {"access_token": READ}, {"read_token": READ}):
        status, body = await get(client, query_string=qs)
        assert (status, code(body)) == (401, "read_unauthorized")


@pytest.mark.parametrize("path", ["/api/v1/runtime", "/api/v1/openapi.json"])
async def test_public_routes(risoluto_client, path):
    client = await make(risoluto_client, read=READ)
    status, _ = await get(client, path)
    assert status == 200


@pytest.mark.parametrize("path", [
    "/API/v1/test/read", "/api//v1/test/read", "/api/v1/test/read/", "/api/v1/./test/read",
    "/api/v1/x/../test/read", "/api%2Fv1%2Ftest%2Fread", "/METRICS", "/metrics/", "//metrics",
    "/api/v1/runtime/", "/API/v1/runtime", "/api/v1/openapi.json/", "/api", "/api/", "/api/v1/runtime/../secrets",
])
async def test_path_variants_stay_guarded(risoluto_client, path):
    client = await make(risoluto_client, read=READ)
    status, body = await get(client, path)
    assert (status, code(body)) == (401, "read_unauthorized"), (path, status, body)


async def test_loopback_reads_need_no_token(risoluto_client):
    client = await make(risoluto_client, read=READ, write=WRITE)
    status, body = await get(client, scope={"client": ("127.0.0.1", 1)})
    assert status == 200 and body["principal"] == "loopback"


async def test_dns_rebound_loopback_read_needs_the_token(risoluto_client):
    client = await make(risoluto_client, read=READ)
    loop = {"client": ("127.0.0.1", 1)}
    status, body = await get(client, scope=loop, headers={"Host": "attacker.example"})
    assert (status, code(body)) == (401, "read_unauthorized")
    status, _ = await get(client, scope=loop, headers={"Host": "attacker.example", "Authorization": f"Bearer {READ}"})
    assert status == 200
    plain = await make(risoluto_client)
    status, body = await get(plain, scope=loop, headers={"Host": "attacker.example"})
    assert (status, code(body)) == (403, "read_forbidden")


async def test_no_token_configured_remote_reads_are_refused(risoluto_client):
    client = await make(risoluto_client)
    status, body = await get(client)
    assert (status, code(body)) == (403, "read_forbidden")
    status, _ = await get(client, "/plain/echo")  # outside /api and /metrics: not this guard's
    assert status == 200


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
async def test_other_safe_methods_guarded_too(risoluto_client, method):
    client = await make(risoluto_client, read=READ)
    status, _ = await get(client, method=method)
    assert status == 401


async def test_proxied_clients_are_remote(risoluto_client):
    client = await make(risoluto_client, read=READ, proxies="127.0.0.1/32")
    status, body = await get(client, scope={"client": ("127.0.0.1", 1)}, headers={"X-Forwarded-For": "127.0.0.1"})
    assert (status, code(body)) == (401, "read_unauthorized")
    status, _ = await get(client, scope={"client": ("127.0.0.1", 1)}, headers={"Authorization": f"Bearer {READ}"})
    assert status == 200


def test_doctor(risoluto_settings):
    from risoluto.kernel import Kernel
    from risoluto.plugins.http import read_guard

    for env, status in (({}, "PASS"), ({"RISOLUTO_BIND": "0.0.0.0"}, "FAIL"),
                        ({"RISOLUTO_BIND": "0.0.0.0", "RISOLUTO_READ_TOKEN": READ}, "PASS")):
        (result,) = read_guard.risoluto_doctor_checks(Kernel(risoluto_settings(env=env)))
        assert result.status == status
