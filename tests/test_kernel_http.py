"""The JSON error envelope for every status, request ids, and the config overlay API."""

import os
import stat

import pytest
import yaml
from quart import Blueprint, g

from risoluto.hookspecs import hookimpl

pytestmark = pytest.mark.anyio


class Boom:
    """A test plugin whose route fails with a secret in the exception text."""

    @hookimpl
    def risoluto_app_blueprints(self, kernel):
        bp = Blueprint("boom", __name__)

        @bp.get("/api/v1/boom")
        async def boom():
            raise RuntimeError("db password is hunter2")

        @bp.post("/api/v1/echo")
        async def echo():
            from risoluto.requests import json_object

            return {"got": await json_object()}

        return [bp]


def assert_envelope(body, code):
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_404_405_and_500_are_json(risoluto_client):
    client = await risoluto_client(plugins=(("boom", Boom()),))
    r = await client.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert_envelope(await r.get_json(), "not_found")
    r = await client.delete("/api/v1/runtime")
    assert r.status_code == 405
    assert_envelope(await r.get_json(), "method_not_allowed")
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "HEAD"}
    r = await client.get("/api/v1/boom")
    assert r.status_code == 500
    text = await r.get_data(as_text=True)
    assert_envelope(await r.get_json(), "internal_error")
    assert "hunter2" not in text and "Traceback" not in text and "RuntimeError" not in text
    assert r.headers["X-Request-ID"]


async def test_400_malformed_json_and_413_oversized_body(risoluto_client):
    client = await risoluto_client(plugins=(("boom", Boom()),))
    r = await client.post("/api/v1/echo", data=b'{"a": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert_envelope(await r.get_json(), "invalid_json")
    r = await client.post("/api/v1/echo", data=b"[1, 2]")
    assert r.status_code == 400
    r = await client.post("/api/v1/echo", data=b" " * (1024 * 1024 + 1))
    assert r.status_code == 413
    assert_envelope(await r.get_json(), "payload_too_large")
    r = await client.post("/api/v1/echo", json={"ok": 1})
    assert r.status_code == 200 and (await r.get_json()) == {"got": {"ok": 1}}


async def test_request_id_is_echoed_only_when_well_formed(risoluto_client):
    client = await risoluto_client()
    r = await client.get("/api/v1/runtime", headers={"X-Request-ID": "req-42.a:b"})
    assert r.headers["X-Request-ID"] == "req-42.a:b"
    r = await client.get("/api/v1/runtime", headers={"X-Request-ID": "bad id; X-Evil: 1"})
    assert len(r.headers["X-Request-ID"]) == 32 and "Evil" not in r.headers["X-Request-ID"]
    r = await client.get("/nope", headers={"X-Request-ID": "x" * 500})
    assert len(r.headers["X-Request-ID"]) == 32


class Nested:
    """A nested blueprint with its own before/after/teardown functions (Quart keys them by the
    blueprint's dotted name, found from the matched endpoint)."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def risoluto_app_blueprints(self, kernel):
        outer, inner = Blueprint("outer", __name__), Blueprint("inner", __name__)

        @inner.get("/api/v1/nested")
        async def nested():
            return {"principal": g.info.principal}

        @outer.before_request
        async def outer_before():
            self.seen.append(("outer", g.info.client))

        @inner.before_request
        async def inner_before():
            self.seen.append(("inner", g.info.client))

        @inner.after_request
        async def inner_after(response):
            self.seen.append(("after", "X-Request-ID" in response.headers, g.info.completed))
            return response

        @inner.teardown_request
        async def inner_teardown(_exc):
            self.seen.append(("teardown", g.info.completed))

        outer.register_blueprint(inner)
        return [outer]


async def test_blueprint_request_functions_run_inside_the_kernel_pipeline(risoluto_client):
    plugin = Nested()
    client = await risoluto_client(plugins=(("nested", plugin),))
    r = await client.get("/api/v1/nested", scope_base={"client": ("127.0.0.1", 40000)})
    assert r.status_code == 200 and (await r.get_json()) == {"principal": "loopback"}
    assert r.headers["X-Request-ID"]
    # the guards ran first (g.info.client decided), the blueprint's after_request before the
    # kernel's headers and completion hooks, its teardown after them
    assert plugin.seen == [("outer", "127.0.0.1"), ("inner", "127.0.0.1"), ("after", False, False),
                           ("teardown", True)]
    plugin.seen.clear()
    r = await client.get("/api/v1/nested", scope_base={"client": ("203.0.113.9", 40000)})
    assert r.status_code == 403 and r.headers["X-Request-ID"]  # a remote read with no token configured
    # refused by the guard: no before_request function ran; the refusal is a response like any other
    assert plugin.seen == [("after", False, False), ("teardown", True)]


async def test_runtime_lists_plugins_with_versions(risoluto_client):
    client = await risoluto_client(plugins=(("boom", Boom()),))
    body = await (await client.get("/api/v1/runtime")).get_json()
    names = {p["name"]: p for p in body["plugins"]}
    assert names["boom"]["source"] == "given"
    defaults = [p for p in body["plugins"] if p["source"] == "default"]
    assert defaults and all(p["version"] == body["version"] and p["distribution"] == "risoluto" for p in defaults)
    assert all(p["version"] for p in body["plugins"] if p["source"] == "entry point")


async def test_overlay_is_validated_saved_atomically_and_applied(risoluto_client, risoluto_data_dir):
    client = await risoluto_client()
    r = await client.get("/api/v1/config/overlay")
    assert (await r.get_json()) == {"overlay": {}}
    r = await client.put("/api/v1/config/overlay", json={"codex": {"sandbox": {"image": "img:v2"}}})
    assert r.status_code == 200, await r.get_data()
    path = risoluto_data_dir / "config" / "overlay.yaml"
    assert yaml.safe_load(path.read_text()) == {"codex": {"sandbox": {"image": "img:v2"}}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert client.app.extensions["risoluto"].settings.codex.sandbox.image == "img:v2"
    before = path.read_bytes()
    for bad, code in (({"codex": {"sandbox": {"image": 7}}}, "invalid_config"), ({"unknownKey": 1}, "invalid_config"),
                      ({"masterKey": "x"}, "overlay_key_not_allowed"),
                      ({"server": {"writeToken": "t"}}, "overlay_key_not_allowed")):
        r = await client.put("/api/v1/config/overlay", json=bad)
        assert r.status_code == 400
        assert_envelope(await r.get_json(), code)
        assert path.read_bytes() == before
    assert client.app.extensions["risoluto"].settings.codex.sandbox.image == "img:v2"
    r = await client.put("/api/v1/config/overlay", data=b"not json")
    assert r.status_code == 400 and path.read_bytes() == before
    leftovers = [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
    assert leftovers == []
    audit = (path.parent / "overlay.audit.log").read_text().splitlines()
    assert len(audit) == 1 and '"overlay_put"' in audit[0]


async def test_overlay_is_checked_by_plugin_validators_too(risoluto_client, risoluto_data_dir):
    client = await risoluto_client()
    r = await client.put("/api/v1/config/overlay", json={"codex": {"sandbox": {"egressAllowlist": ["ok.test"]}}})
    assert r.status_code == 200
    path = risoluto_data_dir / "config" / "overlay.yaml"
    before = path.read_bytes()
    r = await client.put("/api/v1/config/overlay", json={"codex": {"sandbox": {"egressAllowlist": ["bad..name"]}}})
    assert r.status_code == 400
    body = await r.get_json()
    assert body["error"]["code"] == "invalid_config"
    assert "codex.sandbox.egressAllowlist" in body["error"]["message"]
    assert path.read_bytes() == before
    assert client.app.extensions["risoluto"].settings.codex.sandbox.egress_allowlist == ["ok.test"]
